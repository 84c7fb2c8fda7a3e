"""Build hook: generate the gRPC/protobuf stubs from ``proto/`` at install/build time.

The stubs land in ``rewrite/_pb/`` (git-ignored) and are never edited by hand. protoc's
virtual-path mapping (``-Irewrite/_pb=proto``) makes the generated modules import each
other as ``rewrite._pb.queryrewrite.v1...`` while the proto package stays
``queryrewrite.v1`` (what gRPC reflection and clients see).
"""

from __future__ import annotations

import pathlib

from setuptools import Command, setup
from setuptools.command.build_py import build_py
from setuptools.command.egg_info import egg_info

ROOT = pathlib.Path(__file__).parent.resolve()


def generate_stubs() -> None:
    from grpc_tools import protoc  # build requirement (pyproject [build-system])

    out = ROOT / "rewrite" / "_pb"
    protos = sorted((ROOT / "proto").rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    for proto in protos:
        rel = proto.relative_to(ROOT)
        args = [
            "grpc_tools.protoc",
            f"-I{include}",
            "-Irewrite/_pb=proto",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            str(rel),
        ]
        code = protoc.main(args)
        if code != 0:
            raise RuntimeError(f"protoc failed on {rel} (exit {code})")
    # make every generated folder an importable package
    for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    (out / "py.typed").touch()


class GenerateStubs(Command):
    """``python setup.py gen_stubs``: regenerate the stubs only."""

    description = "generate gRPC stubs from proto/"
    user_options: list[tuple[str, str | None, str]] = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        generate_stubs()


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


class EggInfoWithStubs(egg_info):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs, "egg_info": EggInfoWithStubs, "gen_stubs": GenerateStubs})
