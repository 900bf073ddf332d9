"""Export the AutoTM ILPs of the conventional set at 1:4 as compressed MPS files.

Writes solvers/<net>_<formulation>_1-4.mps.gz for static, synchronous and asynchronous
(kernel times: the roofline estimate, modeled; each asynchronous model as `autotm optimize`
builds it by default, with the overlap-candidate restriction on large graphs). Files are
added smallest first while the folder stays under 50 MB; what does not fit is listed in
solvers/INSTANCES.md.

    python scripts/export_solver_instances.py [--budget-mb 50]
"""

from __future__ import annotations

import argparse
import os
import tempfile

from autotm_py.cli.common import capture_workload
from autotm_py.optimizer.formulation import async_restriction
from autotm_py.optimizer.ilp import build_model
from autotm_py.optimizer.limits import limit_from_ratio
from autotm_py.optimizer.roofline import roofline_profile
from autotm_py.optimizer.solver import write_mps

CONVENTIONAL = (("inception_v4", 1024), ("resnet200", 512), ("vgg19", 2048), ("densenet264", 512),
                ("transformer", 512))
FORMS = ("static", "synchronous", "asynchronous")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "solvers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-mb", type=float, default=50.0)
    ap.add_argument("--out", default=ROOT)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    made = []
    rule = async_restriction("auto")  # the asynchronous model `autotm optimize` builds by default
    with tempfile.TemporaryDirectory() as tmp:
        for net, batch in CONVENTIONAL:
            g = capture_workload(net, batch)
            prof = roofline_profile(g)
            limit = limit_from_ratio(g, "1:4")
            for f in FORMS:
                model = build_model(g, prof, f, limit, async_candidates=rule.candidates,
                                    full_below=rule.full_below, small_above=rule.small_above,
                                    small_share=rule.small_share)
                name = f"{net}_{f}_1-4.mps.gz"
                path = os.path.join(tmp, name)
                write_mps(model, path)
                made.append((os.path.getsize(path), name, path, model.num_cols, model.num_rows,
                             model.num_nonzeros))
                print(f"{name}: {model.num_cols:,} columns, {model.num_rows:,} rows, "
                      f"{os.path.getsize(path) / 1e6:.2f} MB", flush=True)
        budget = args.budget_mb * 1e6 - 200e3  # room for the scripts and the index
        kept, left = [], []
        total = 0
        for size, name, path, *dims in sorted(made):
            if total + size <= budget:
                total += size
                os.replace(path, os.path.join(args.out, name))
                kept.append((name, size, *dims))
            else:
                left.append((name, size, *dims))
    with open(os.path.join(args.out, "INSTANCES.md"), "w") as fh:
        fh.write("# AutoTM ILP instances (conventional set, fast:slow 1:4)\n\n"
                 "Kernel times are a roofline estimate (modeled); objective in milliseconds. "
                 f"Asynchronous models are built as the optimizer's default builds them: above "
                 f"{rule.full_below:,} overlap candidates in all, the first, the last and the "
                 f"{rule.candidates} longest per interval between uses; below, every candidate; "
                 f"above {rule.small_above:,}, none for the smallest tensors holding "
                 f"{rule.small_share:.0%} of the free bytes. "
                 "Made by scripts/export_solver_instances.py; time them with solvers/time_solvers.py.\n\n"
                 "| file | MB | columns | rows | nonzeros |\n|---|---:|---:|---:|---:|\n")
        for name, size, c, r, nz in kept:
            fh.write(f"| {name} | {size / 1e6:.2f} | {c:,} | {r:,} | {nz:,} |\n")
        if left:
            fh.write(f"\nLeft out to keep the folder under {args.budget_mb:.0f} MB:\n\n")
            for name, size, c, r, nz in left:
                fh.write(f"- {name} ({size / 1e6:.1f} MB, {c:,} columns, {nz:,} nonzeros)\n")
    print(f"kept {len(kept)} files ({total / 1e6:.1f} MB), left out {len(left)}: "
          + ", ".join(n for n, *_ in left))


if __name__ == "__main__":
    main()
