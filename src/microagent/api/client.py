"""``Microagent``: the entry point of the public API, one per state directory.

Creating one does no I/O. The first call that touches the state directory checks it once
(as the CLI does per command): a path that is not a directory, or one another user can
write, is refused.
"""

from __future__ import annotations

import builtins
import os

from microagent.errors import UsageError

# Only what a client needs to exist is imported here: ``import microagent`` and
# ``Microagent()`` stay light (bench/cli_startup.py); each call imports its own modules.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence
    from contextlib import AbstractContextManager
    from pathlib import Path
    from typing import Any

    from microagent.api.results import ExecResult
    from microagent.api.workspace import Callback, Workspace
    from microagent.disks.volumes import Volume
    from microagent.images.catalog import Image
    from microagent.kernel.kernels import KernelBundle
    from microagent.layout import StateLayout
    from microagent.progress import Progress
    from microagent.state.records import WorkspaceSpec
    from microagent.workspace.copy import CopyResult
    from microagent.workspace.doctor import Check

DEFAULT_START_TIMEOUT = 120.0


class Microagent:
    """Workspaces, images, volumes and kernels of one state directory.

    ``state_dir`` defaults to ``$MICROAGENT_HOME``, else ``~/.microagent``.
    """

    def __init__(self, state_dir: str | os.PathLike[str] | None = None) -> None:
        self._given = os.path.expanduser(state_dir) if state_dir is not None else None
        self._checked: StateLayout | None = None
        self.images = Images(self)
        self.volumes = Volumes(self)
        self.kernels = Kernels(self)

    def __repr__(self) -> str:
        return f"<Microagent {self.state_dir}>"

    @property
    def state_dir(self) -> Path:
        """The state directory this client works in."""
        from microagent.layout import StateLayout

        return StateLayout.resolve(self._given).root

    @property
    def layout(self) -> StateLayout:
        """The state directory's layout, checked on first use."""
        if self._checked is None:
            from microagent.layout import StateLayout
            from microagent.store import check_state_dir, check_state_dir_usable

            layout = StateLayout.resolve(self._given)
            check_state_dir_usable(layout.root)
            check_state_dir(layout.root)
            self._checked = layout
        return self._checked

    # --- workspaces -------------------------------------------------------------------

    def fork(self, name: str, source: str, *, hostname: str | None = None,
             publish: Sequence[str] = (), progress: Progress | None = None) -> Workspace:
        """A new workspace ``name`` from the snapshot ``source`` (``"NAME:TAG"``), state
        ``prepared``: its own copy of the disks, its own hostname (``hostname``, default
        its name), machine-id and published ports; its first start resumes from that
        memory."""
        from microagent.api.workspace import Workspace
        from microagent.network import parse_publish
        from microagent.state.forks import fork_workspace

        if isinstance(publish, str) or not all(isinstance(p, str) for p in publish):
            raise UsageError(f"invalid publish {publish!r}: a list of str")
        fork_workspace(self.layout, _text(name, "name"), _text(source, "snapshot"),
                       hostname=hostname or "",
                       ports=tuple(parse_publish(p) for p in publish), progress=progress)
        return Workspace(self.layout, name)

    def create(self, name: str, image: str | None = None, *, profile: str | None = None,
               memory_mib: int | None = None, cpus: int | None = None,
               disk_mib: int | None = None, setup: Sequence[str] = (),
               env: Mapping[str, str] | Sequence[str] | None = None, hostname: str | None = None,
               network: str = "user", publish: Sequence[str] = (), volumes: Sequence[str] = (),
               disks: Sequence[str] = (), bundles: Sequence[str] = (), restart: str = "never",
               kernel: str | os.PathLike[str] | None = None, backend: str = "qemu",
               setup_output: Callback | None = None, progress: Progress | None = None,
               from_snapshot: str | None = None) -> Workspace:
        """Create the workspace ``name`` from ``image`` (state ``prepared``); with
        ``setup``, boot it once, run each command with ``/bin/sh -c`` (output to
        ``setup_output``) and halt it. ``publish``, ``volumes``, ``disks`` and
        ``bundles`` take the CLI's ``--publish``/``--volume``/``--disk``/``--bundle``
        syntax, one str each. ``from_snapshot="NAME:TAG"`` instead of an image: a fork
        (:meth:`fork`; only ``hostname`` and ``publish`` apply)."""
        from microagent.api.workspace import Workspace
        from microagent.state.records import create_workspace, get_workspace

        if from_snapshot is not None:
            others = (image, profile, memory_mib, cpus, disk_mib, kernel, env) + \
                ((network,) if network != "user" else ()) + \
                ((restart,) if restart != "never" else ()) + tuple(setup) + \
                tuple(volumes) + tuple(disks) + tuple(bundles)
            if any(x for x in others):
                raise UsageError("a fork takes its image, resources and attachments from "
                                 "the snapshot: only hostname and publish apply")
            return self.fork(name, from_snapshot, hostname=hostname, publish=publish,
                             progress=progress)
        if image is None:
            raise UsageError("create needs an image (or from_snapshot)")

        spec = self.spec(name, image, profile=profile, memory_mib=memory_mib, cpus=cpus,
                         disk_mib=disk_mib, setup=setup, env=env, hostname=hostname,
                         network=network, publish=publish, volumes=volumes, disks=disks,
                         bundles=bundles, restart=restart, kernel=kernel, backend=backend)
        create_workspace(self.layout, spec, progress=progress)
        if spec.setup:
            from microagent.workspace.provision import provision_at_create

            provision_at_create(self.layout, spec.name, setup_output or _discard,
                                progress=progress)
        return Workspace(self.layout, spec.name, get_workspace(self.layout, spec.name).to_json())

    def spec(self, name: str, image: str, *, profile: str | None = None,
             memory_mib: int | None = None, cpus: int | None = None,
             disk_mib: int | None = None, setup: Sequence[str] = (),
             env: Mapping[str, str] | Sequence[str] | None = None, hostname: str | None = None,
             network: str = "user", publish: Sequence[str] = (), volumes: Sequence[str] = (),
             disks: Sequence[str] = (), bundles: Sequence[str] = (), restart: str = "never",
             kernel: str | os.PathLike[str] | None = None,
             backend: str = "qemu") -> WorkspaceSpec:
        """The validated spec ``create`` would make (nothing is written)."""
        from pathlib import Path

        from microagent.api.workspace import env_items
        from microagent.config import resolve_resources
        from microagent.disks.attachments import parse_bundle, parse_disk, parse_volume
        from microagent.network import parse_publish
        from microagent.state.records import WorkspaceSpec

        for what, value in (("an image", image), ("a name", name)):
            if not isinstance(value, str) or not value:
                raise UsageError(f"create needs {what}, a non-empty str")
        for what, items in (("setup", setup), ("publish", publish), ("volumes", volumes),
                            ("disks", disks), ("bundles", bundles)):
            if isinstance(items, str) or not all(isinstance(i, str) for i in items):
                raise UsageError(f"invalid {what} {items!r}: a list of str")
        return WorkspaceSpec(
            name=name, image=image,
            resources=resolve_resources(profile, memory_mib=memory_mib, cpus=cpus,
                                        disk_mib=disk_mib),
            backend=backend, network=network, restart=restart,
            env=env_items(env, "env"), hostname=hostname or "", setup=tuple(setup),
            disks=(*map(parse_volume, volumes), *map(parse_disk, disks),
                   *map(parse_bundle, bundles)),
            ports=tuple(map(parse_publish, publish)),
            kernel=str(Path(kernel).expanduser().absolute()) if kernel else "",
        )

    def get(self, name: str) -> Workspace:
        """The workspace ``name``; NotFoundError if there is none (a broken record is
        still a workspace: its status says why)."""
        from microagent.api.workspace import Workspace
        from microagent.errors import BrokenWorkspaceError
        from microagent.state.records import get_workspace

        try:
            attrs = get_workspace(self.layout, name).to_json()
        except BrokenWorkspaceError as e:
            attrs = e.workspace.to_json() if e.workspace is not None else {}
        return Workspace(self.layout, name, attrs)

    def handle(self, name: str) -> Workspace:
        """A handle on ``name`` without reading anything: each call on it checks that the
        workspace exists (NotFoundError) as it needs to (halt, stop, kill, logs and
        events also work on a broken record)."""
        from microagent.api.workspace import Workspace
        from microagent.config import validate_name

        return Workspace(self.layout, validate_name(_text(name, "workspace name")))

    def list(self, *, running: bool = False) -> list[Workspace]:
        """Every workspace, sorted by name (``running``: those with a live VM, as ``ps``)."""
        from microagent.api.workspace import Workspace
        from microagent.state.records import list_workspaces

        records = list_workspaces(self.layout)
        if running:
            records = [w for w in records
                       if w.state in ("starting", "running", "halting", "quarantined",
                                      "paused")]
        return [Workspace(self.layout, w.name, w.to_json()) for w in records]

    def delete(self, name: str) -> bool:
        """Delete ``name`` if it exists (ConflictError while a VM process lives)."""
        from microagent.api.workspace import Workspace

        return Workspace(self.layout, name).delete()

    def copy(self, source: str, destination: str, *, archive: bool = False) -> CopyResult:
        """``cp``: copy between the host and a workspace, exactly one side given as
        ``NAME:/path`` (running: through the agent; otherwise: its disk)."""
        from microagent.workspace.copy import copy

        return copy(self.layout, _text(source, "source"), _text(destination, "destination"),
                    archive=archive)

    # --- one-shot and scratch ---------------------------------------------------------

    def run(self, image: str, command: str | Sequence[str] | None = None, *,
            cwd: str | None = None, user: str | None = None,
            stdin: bytes | str | None = None, timeout: float | None = None,
            check: bool = False, on_stdout: Callback | None = None,
            on_stderr: Callback | None = None,
            start_timeout: float = DEFAULT_START_TIMEOUT, **create: Any) -> ExecResult:
        """Run one command in a new workspace of ``image`` and remove it (also when this
        fails, is interrupted or the process gets SIGTERM). ``command`` None runs the
        image's Entrypoint and Cmd; ``create`` takes :meth:`create`'s options."""
        with self.scratch(image, start_timeout=start_timeout, **create) as ws:
            if command is None:
                from microagent.state.records import get_workspace
                from microagent.workspace.oneshot import command_of

                config = get_workspace(self.layout, ws.name).image_config
                command = list(command_of((), config.entrypoint, config.cmd))
            return ws.exec(command, cwd=cwd, user=user, stdin=stdin, timeout=timeout,
                           check=check, on_stdout=on_stdout, on_stderr=on_stderr)

    def scratch(self, image: str, *, name: str | None = None,
                start_timeout: float = DEFAULT_START_TIMEOUT,
                **create: Any) -> AbstractContextManager[Workspace]:
        """A new workspace of ``image``, created and started; killed and deleted when the
        block ends, also when it raises or the process gets SIGTERM or SIGHUP (in the
        main thread, which alone receives them: they raise ``KeyboardInterrupt`` there
        for the block's duration). ``create`` takes :meth:`create`'s options."""
        import contextlib

        return contextlib.contextmanager(self._scratch)(image, name, start_timeout, create)

    def _scratch(self, image: str, name: str | None, start_timeout: float,
                 create: dict[str, Any]) -> Iterator[Workspace]:
        from microagent.api.workspace import check_timeout
        from microagent.workspace.oneshot import (
            discard_workspace,
            ignoring_interrupts,
            scratch_name,
            terminating_raises_interrupt,
        )

        check_timeout(start_timeout, "start timeout", zero=False)
        chosen = name or scratch_name(self.layout)
        created = False
        try:
            with terminating_raises_interrupt():
                try:
                    ws = self.create(chosen, image, **create)
                except KeyboardInterrupt:
                    created = self.layout.workspace_dir(chosen).exists() and name is None
                    raise
                created = True
                ws.start(start_timeout)
                yield ws
        finally:
            if created:
                with ignoring_interrupts():
                    discard_workspace(self.layout, chosen)

    # --- host -------------------------------------------------------------------------

    def doctor(self) -> builtins.list[Check]:
        """The host checks of ``microagent doctor`` (read-only), each ok, warn or fail."""
        from microagent.layout import StateLayout
        from microagent.workspace.doctor import run_checks

        return run_checks(StateLayout.resolve(self._given))


def client_for(layout: StateLayout) -> Microagent:
    """A client of ``layout``, a state directory its caller has checked already (the
    CLI's ``layout_of``): the check is not repeated."""
    client = Microagent(layout.root)
    client._checked = layout
    return client


class Images:
    """The image cache (``ma.images``)."""

    def __init__(self, client: Microagent) -> None:
        self._client = client

    def pull(self, reference: str, *, progress: Progress | None = None) -> Image:
        """Pull ``reference`` (a registry reference, ``oci:DIR[:TAG]`` or
        ``docker-archive:TAR``) into the cache; returns what was recorded."""
        from microagent.images.catalog import pull_image

        return pull_image(self._client.layout, _text(reference, "image reference"),
                          progress=progress)

    def list(self) -> list[Image]:
        """The cached images, by reference."""
        from microagent.images.catalog import list_images

        return list_images(self._client.layout)

    def remove(self, reference: str) -> Image:
        """Forget ``reference`` and the blobs no other image uses; returns it."""
        from microagent.images.catalog import remove_image

        return remove_image(self._client.layout, _text(reference, "image reference"))


class Volumes:
    """Named volumes (``ma.volumes``)."""

    def __init__(self, client: Microagent) -> None:
        self._client = client

    def create(self, name: str, size_mib: int | None = None) -> Volume:
        """A new empty ext4 volume (sparse; default 1024 MiB)."""
        from microagent.config import DEFAULT_VOLUME_MIB
        from microagent.disks.volumes import create_volume

        return create_volume(self._client.layout, _text(name, "volume name"),
                             DEFAULT_VOLUME_MIB if size_mib is None else size_mib)

    def get(self, name: str) -> Volume:
        """The volume ``name``; NotFoundError if there is none."""
        from microagent.disks.volumes import get_volume

        return get_volume(self._client.layout, _text(name, "volume name"))

    def list(self) -> list[Volume]:
        """Every volume, by name."""
        from microagent.disks.volumes import list_volumes

        return list_volumes(self._client.layout)

    def users(self, name: str) -> builtins.list[str]:
        """The workspaces, running or not, whose records attach the volume ``name``."""
        from microagent.disks.volumes import volume_users

        return volume_users(self._client.layout, _text(name, "volume name"))

    def delete(self, name: str, *, force: bool = False) -> bool:
        """Delete ``name`` (refused while a workspace records it, unless ``force``;
        always while a running one holds it); False when there was none."""
        from microagent.disks.volumes import delete_volume

        return delete_volume(self._client.layout, _text(name, "volume name"), force=force)


class Kernels:
    """Guest kernel bundles (``ma.kernels``)."""

    def __init__(self, client: Microagent) -> None:
        self._client = client

    def install(self, from_path: str | os.PathLike[str] | None = None, *,
                modules: str | os.PathLike[str] | None = None,
                progress: Progress | None = None) -> KernelBundle:
        """Install a kernel bundle (the default kernel, or one from ``from_path``)."""
        from pathlib import Path

        from microagent.kernel.kernels import install_kernel

        return install_kernel(
            self._client.layout,
            from_path=Path(from_path).expanduser() if from_path is not None else None,
            modules_dir=Path(modules).expanduser() if modules is not None else None,
            progress=progress)

    def list(self) -> list[KernelBundle]:
        """The installed bundles; ``default`` marks the one workspaces boot."""
        from microagent.kernel.kernels import list_kernels

        return list_kernels(self._client.layout)


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise UsageError(f"invalid {what} {value!r}: a non-empty str")
    return value


def _discard(_data: bytes) -> None:
    pass


