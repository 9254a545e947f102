"""``microagent completion bash|zsh``: the scripts parse, and the shells complete with them.

bash runs the completion function the script registers, the way bash's programmable
completion calls it (``COMP_WORDS``, ``COMP_CWORD``); zsh, if installed, completes on a
pseudo-terminal with its own completion system (``compinit``) and the script on its
``fpath``, as a user's shell does after a TAB, and reports what it offered.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from microagent.cli import main
from microagent.errors import EXIT_USAGE

WORKSPACES = ("alpha", "beta")


def script_of(shell: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["completion", shell]) == 0
    return capsys.readouterr().out


@pytest.fixture
def named_workspaces(state_dir: Path) -> Path:
    """A state directory whose listing has two workspaces (only the names matter)."""
    for name in WORKSPACES:
        (state_dir / "workspaces" / name).mkdir(parents=True)
    return state_dir


def bash_complete(script: Path, line: str) -> list[str]:
    """What bash offers for a TAB at the end of ``line``, through the function that the
    script registered for ``microagent`` with ``complete -F``."""
    program = f"""
        source {shlex.quote(str(script))}
        function=$(complete -p microagent | sed -E 's/.* -F ([^ ]+) .*/\\1/')
        line={shlex.quote(line)}
        read -ra COMP_WORDS <<< "$line"
        [[ $line == *" " ]] && COMP_WORDS+=("")
        COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 )) COMP_LINE=$line COMP_POINT=${{#line}}
        "$function" microagent "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", program],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return sorted(filter(None, done.stdout.splitlines()))


def test_bash_script_parses_and_completes_verbs_names_and_options(
        named_workspaces: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "microagent.bash"
    script.write_text(script_of("bash", capsys))
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                             check=False)
    assert checked.returncode == 0, checked.stderr

    assert bash_complete(script, "microagent st") == ["start", "status", "stop"]
    assert bash_complete(script, "microagent image ") == ["list", "ls", "pull", "remove", "rm"]
    assert bash_complete(script, "microagent start ") == list(WORKSPACES)
    assert bash_complete(script, "microagent exec a") == ["alpha"]
    assert bash_complete(script, "microagent halt --name b") == ["beta"]
    assert bash_complete(script, "microagent create ") == []  # a new name: nothing to offer
    assert "--json" in bash_complete(script, "microagent --")
    assert bash_complete(script, "microagent completion ") == ["bash", "zsh"]


# An interactive zsh on a pseudo-terminal, the script's directory on its fpath; compadd
# (through which every completion function offers its matches) also prints each match,
# and a function run after the completion marks the end. The strings are split in two so
# that the terminal's echo of the typed commands does not match them.
ZSH_DRIVER = r"""
zmodload zsh/zpty
zpty shell 'zsh -f -i'
zpty -w shell 'bindkey -e; PS1=""; unset zle_bracketed_paste'
zpty -w shell "fpath=(${(q)1} \$fpath); autoload -Uz compinit; compinit -u -D"
zpty -w shell 'compadd() {
  if [[ ${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then builtin compadd "$@"; return; fi
  local -a hits; builtin compadd -A hits "$@"
  (( $#hits )) && print -rl -- "" "off""ered:"${^hits} >/dev/tty
  builtin compadd "$@"
}'
zpty -w shell '_end() { print -r -- "" "END""OF""LISTING" >/dev/tty }; comppostfuncs=(_end)'
zpty -w -n shell "$2"$'\t'
zpty -r shell listing '*ENDOFLISTING*'
zpty -d shell
print -r -- "$listing"
"""
OFFERED = "offered:"


def zsh_complete(functions: Path, line: str) -> list[str]:
    """What zsh's completion system offers for a TAB at the end of ``line``."""
    done = subprocess.run(["zsh", "-f", "-c", ZSH_DRIVER, "zsh", str(functions), line],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    lines = (line.strip() for line in done.stdout.splitlines())
    return sorted(line.removeprefix(OFFERED) for line in lines if line.startswith(OFFERED))


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_script_parses_and_completes_verbs_and_names(
        named_workspaces: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    functions = tmp_path / "zsh-functions"
    functions.mkdir()
    script = functions / "_microagent"  # an autoloaded completion function, as documented
    script.write_text(script_of("zsh", capsys))
    checked = subprocess.run(["zsh", "-n", str(script)], capture_output=True, text=True,
                             check=False)
    assert checked.returncode == 0, checked.stderr

    assert zsh_complete(functions, "microagent st") == ["start", "status", "stop"]
    assert zsh_complete(functions, "microagent image ") == ["list", "ls", "pull", "remove",
                                                             "rm"]
    assert zsh_complete(functions, "microagent start ") == list(WORKSPACES)
    assert zsh_complete(functions, "microagent halt --name b") == ["beta"]
    assert "--timeout" in zsh_complete(functions, "microagent start --")


def test_json_carries_the_script_and_an_unknown_shell_is_a_usage_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "completion", "bash"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["shell"] == "bash" and "complete -o bashdefault" in doc["script"]
    assert main(["completion", "fish"]) == EXIT_USAGE
    assert "invalid choice: 'fish'" in capsys.readouterr().err
