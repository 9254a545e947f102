"""``image pull|list|rm`` and ``kernel install|list``: the caches a workspace is built from."""

from __future__ import annotations

import argparse

from microagent.cli.output import Output, Parser, Verbs, ago, client_of, table
from microagent.errors import EXIT_OK, UsageError


def cmd_image_pull(args: argparse.Namespace, out: Output) -> int:
    image = client_of(args).images.pull(args.reference, progress=out.progress())
    out.emit(image.to_json(), f"{image.reference} {image.digest}")
    return EXIT_OK


def cmd_image_list(args: argparse.Namespace, out: Output) -> int:
    from microagent.progress import format_size

    images = client_of(args).images.list()
    rows = [[i.reference, i.digest[:19], format_size(i.size), ago(i.pulled)] for i in images]
    text = table(["REF", "DIGEST", "SIZE", "PULLED"], rows) if images else "No images."
    out.emit({"images": [i.to_json() for i in images]}, text)
    return EXIT_OK


def cmd_image_rm(args: argparse.Namespace, out: Output) -> int:
    image = client_of(args).images.remove(args.reference)
    out.emit({"removed": image.to_json()}, f"Removed {image.reference}")
    return EXIT_OK


def cmd_kernel_install(args: argparse.Namespace, out: Output) -> int:
    bundle = client_of(args).kernels.install(args.from_path or None,
                                             modules=args.modules or None,
                                             progress=out.progress())
    out.emit(bundle.to_json(), f"Installed kernel {bundle.version} ({bundle.source}) "
                               f"with {len(bundle.modules)} modules")
    return EXIT_OK


def cmd_kernel_list(args: argparse.Namespace, out: Output) -> int:
    bundles = client_of(args).kernels.list()
    rows = [[b.version, "yes" if b.default else "", b.source, str(len(b.modules))]
            for b in bundles]
    text = table(["VERSION", "DEFAULT", "SOURCE", "MODULES"], rows) if bundles \
        else "No kernels installed."
    out.emit({"kernels": [b.to_json() for b in bundles]}, text)
    return EXIT_OK


def usage_of(parser: argparse.ArgumentParser) -> int:
    raise UsageError(f"{parser.prog} needs a command", hint=f"see `{parser.prog} --help`")


def register(verbs: Verbs) -> None:
    image = verbs.add_parser("image", help="manage cached images", description="images")
    image_verbs = image.add_subparsers(dest="image_verb", metavar="COMMAND", parser_class=Parser)
    image.set_defaults(handler=lambda a, o: usage_of(image))
    p = image_verbs.add_parser("pull", help="pull an image into the cache")
    p.add_argument("reference", metavar="REF")
    p.set_defaults(handler=cmd_image_pull)
    p = image_verbs.add_parser("list", aliases=["ls"], help="list cached images")
    p.set_defaults(handler=cmd_image_list)
    p = image_verbs.add_parser("rm", aliases=["remove"], help="remove a cached image")
    p.add_argument("reference", metavar="REF")
    p.set_defaults(handler=cmd_image_rm)

    kernel = verbs.add_parser("kernel", help="manage guest kernels", description="kernels")
    kernel_verbs = kernel.add_subparsers(dest="kernel_verb", metavar="COMMAND",
                                         parser_class=Parser)
    kernel.set_defaults(handler=lambda a, o: usage_of(kernel))
    p = kernel_verbs.add_parser("install", help="install a kernel bundle")
    p.add_argument("--from", dest="from_path", metavar="PATH",
                   help="a bzImage, an unpacked kernel package or a .deb")
    p.add_argument("--modules", metavar="DIR", help="the modules directory for a bzImage")
    p.set_defaults(handler=cmd_kernel_install)
    p = kernel_verbs.add_parser("list", aliases=["ls"], help="list installed kernels")
    p.set_defaults(handler=cmd_kernel_list)
