#!/usr/bin/env bash
# Install everything microagent needs on a Debian or Ubuntu host, then run the main job
# end to end on an image built offline from busybox-static.
#   ./install.sh             install, then the demo
#   ./install.sh --no-demo   install only (what the test command uses)
set -euo pipefail
cd "$(dirname "$0")"

demo=1
[ "${1:-}" = "--no-demo" ] && demo=0

packages=(
  python3 python3-venv python3-dev gcc make libc6-dev
  e2fsprogs zstd cpio
  qemu-system-x86 qemu-utils passt
  docker-registry apache2-utils openssl
  busybox-static debootstrap debian-archive-keyring tmux util-linux
)

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing system packages: ${missing[*]}" >&2
  as_root apt-get update -q
  # No recommends: QEMU's alone pull in hundreds of MB of desktop and GStreamer libraries
  # that a headless microVM never uses; every package the suite needs is named above.
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  # The registry package starts a system service; the tests start their own on loopback.
  if [ -d /run/systemd/system ]; then
    as_root systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
fi

# The venv uses the distribution's python3 so that other users (the non-root tests) can run it.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
# pip installs the package as a user installs a checkout: its build (setup.py) compiles
# the guest agent; no make here. Editable (-e: the venv runs this tree's code, the agent is
# built in place in src/microagent/guest/build/), with the dev extra for ./test.sh. pip
# runs again when the build's definition or the agent's sources change.
stamp=.venv/.microagent-installed
agent=src/microagent/guest/build/microagent-init
guest_changed() {
  [ -n "$(find src/microagent/guest -maxdepth 1 -newer "$stamp" \
            \( -name '*.[ch]' -o -name Makefile \) -print -quit)" ]
}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] ||
   [ ! -x "$agent" ] || guest_changed; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
# Bytecode now, as a non-editable pip install would: an editable install leaves it to the
# first import, which never writes it under PYTHONDONTWRITEBYTECODE (then every CLI and
# supervisor start compiles the package again: ~0.2 s of each `start`, ~30 ms of `exec`).
.venv/bin/python -m compileall -q src/microagent

if [ "$demo" = 1 ]; then
  # the default guest kernel, into the user's state directory (Debian's kernel package)
  .venv/bin/microagent kernel install
  state=$(mktemp -d "${TMPDIR:-/tmp}/microagent-demo.XXXXXX")
  trap '.venv/bin/microagent kill demo >/dev/null 2>&1 || true; rm -rf "$state"' EXIT
  .venv/bin/python tools/build_oci_image.py busybox "$state/busybox-oci"
  export MICROAGENT_HOME="$state/home"
  .venv/bin/microagent image pull "oci:$state/busybox-oci:latest"
  .venv/bin/microagent image list
  .venv/bin/microagent create demo --image "oci:$state/busybox-oci:latest" --profile tiny
  # the seed page's loop: boot, write, halt, boot back into the same disk
  .venv/bin/microagent start demo
  .venv/bin/microagent exec demo -- sh -c "echo 'notes from run 1' > /root/notes.txt"
  .venv/bin/microagent list
  .venv/bin/microagent halt demo
  .venv/bin/microagent start demo
  .venv/bin/microagent exec demo -- /bin/cat /root/notes.txt
  .venv/bin/microagent connect demo --send "uname -r"
  .venv/bin/microagent halt demo
  .venv/bin/microagent delete demo --yes
  echo "microagent is installed: .venv/bin/microagent"
fi
