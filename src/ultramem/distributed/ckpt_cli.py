"""`ultramem ckpt convert SRC DST`: DCP directory <-> single-file safetensors checkpoint."""

from __future__ import annotations

import argparse


def add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="ckpt_command", required=True, metavar="ACTION")
    c = sub.add_parser("convert", help="a DCP checkpoint directory <-> an ultramem .safetensors checkpoint "
                                       "(model weights; the direction follows SRC)")
    c.add_argument("src", help="a DCP directory (from a sharded run) or a .safetensors checkpoint / run dir")
    c.add_argument("dst", help="where to write the other format")


def handler(a) -> int:
    from .checkpoint import convert  # torch.distributed.checkpoint only when asked for

    print(f"wrote {convert(a.src, a.dst)}")
    return 0
