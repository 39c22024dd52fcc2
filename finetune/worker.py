"""One of the `train.nproc` processes torchrun starts for `kinject train --nproc N`:

    python -m torch.distributed.run --standalone --nproc-per-node N -m kinject.finetune.worker \\
        --kb NAME --settings JSON [--force] [--merge] [--quiet]

It joins the process group and runs the stage (`train.train`) as its rank. Rank 0 writes the
adapter and report.json, which the launching process reads back and prints.
"""
from __future__ import annotations

import argparse
import json
import sys

from kinject.core.errors import KinjectError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kinject.finetune.worker", description=__doc__)
    parser.add_argument("--kb", required=True)
    parser.add_argument("--settings", required=True, help="The launcher's effective settings as JSON")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--merge", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    from kinject.core.kb import KB
    from kinject.core.models import pick_device
    from kinject.core.settings import load_settings
    from kinject.finetune import distributed
    from kinject.finetune.train import train

    where = ""
    try:
        settings = load_settings(json.loads(args.settings))
        with distributed.process_group(pick_device(settings.engine.device)):
            where = f" (rank {distributed.rank()} of {distributed.world_size()})"
            train(KB.open(settings, args.kb), settings, progress=not args.quiet, force=args.force, merge=args.merge)
    except KinjectError as e:
        print(f"error{where}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
