"""Label-scarce benchmark on real photos: supervised vs PseudoSeg with few labeled images, the
rest of train unlabeled, and the supervised ceiling with every train image labeled.

  python benchmarks/label_scarce.py --out=workdirs/label_scarce [--seeds=0,1,2]
      --root=PATH/TO/stanford_background [--ignore_label=15] [--fractions=1_32,1_8]
      [--preset=cpu] [--steps=N] [--runs=supervised,pseudoseg,weak_labels]
      [--ablations=paper,no_cutmix,...] [--report_only]

The dataset is a folder dataset (pseudoseg_jax/data/datasets/folder.py): ROOT/images, masks,
splits/val.txt; with no splits/labeled.txt, the labeled pool is every masked image outside val.
The default is the Stanford Background Dataset (715 outdoor photos, 8 classes, 15 = unknown;
train 572 / val 143), which the project does not ship: point --root at your copy.

For each labeled fraction and seed, the labeled images are a sample of the pool drawn with that
seed (data.split_seed = seed, so each seed sees other labeled images), and the runs are:
  supervised                      the labeled images alone;
  pseudoseg                       the preset's recipe, the rest of train as unlabeled images;
  pseudoseg (image-level labels)  the same with the unlabeled images' image-level labels (at the
                                  smallest fraction only);
--ablations adds, at the smallest fraction, PseudoSeg with one of the preset's options changed
(ABLATIONS: "paper" is the original's recipe on the preset's model and schedule; "debias" divides
the teacher's probabilities by the square root of its running class prior, as DebiasPL;
"debias_image_labels" does so with image-level labels; "feature_perturbation" adds UniMatch's
stream of channel-dropped features, "feature_perturbation_strong" drops them in the strong pass;
"claim_present_classes" scales each class the image holds to a peak of 1,
"claim_present_classes_image_labels" with image-level labels; "batch_stats_from_all" lets the
strong views move the batch-norm statistics, as the paper and the preset before 2026-12-06 did);
and the ceiling, supervised on all of train, at the --ceiling_seeds (default: the first seed
only; its labels are the same at every seed, only the training randomness differs). Every run has
the same steps and batches; each is the ordinary training command in its own workdir under
--out, so an interrupted benchmark resumes. The table goes to stdout and OUT/results.md, the
numbers to OUT/results.json. It is a benchmark, not a test: on a 2-core CPU about 8 (supervised)
and 15 (PseudoSeg) minutes per run at the preset's 500 steps, 5 and 10 with --steps=250.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from pseudoseg_vs_supervised import PSEUDO_METRICS, run_name, summarize, train_run


SEMI_SUPERVISED_RUNS = {
    "supervised": {"method": "supervised"},
    "pseudoseg": {"method": "pseudoseg"},
    "pseudoseg (image-level labels)": {"method": "pseudoseg", "weak_labels": "true"},
}
WEAK_LABELS_ONLY_AT_SMALLEST = "pseudoseg (image-level labels)"
# --runs: which of SEMI_SUPERVISED_RUNS to train (all by default).
RUN_FLAGS = {"supervised": "supervised", "pseudoseg": "pseudoseg",
             "weak_labels": WEAK_LABELS_ONLY_AT_SMALLEST}
# DebiasPL's debiasing of the teacher's class prior, at half strength.
DEBIAS = {"pseudoseg.distribution_alignment": True,
          "pseudoseg.distribution_alignment_target": "uniform",
          "pseudoseg.distribution_alignment_strength": 0.5}
# --ablations: the preset's PseudoSeg with one option changed, at the smallest fraction.
ABLATIONS = {
    "paper": {"pseudoseg.teacher": "student", "pseudoseg.soft_labels": True,
              "pseudoseg.confidence_threshold": 0.0, "pseudoseg.class_balanced_fraction": 0.0,
              "pseudoseg.cutmix_probability": 0.0, "pseudoseg.consistency_rampup_steps": 0},
    "no_mean_teacher": {"pseudoseg.teacher": "student"},
    "no_cutmix": {"pseudoseg.cutmix_probability": 0.0},
    "no_class_balance": {"pseudoseg.class_balanced_fraction": 0.0},
    "no_rampup": {"pseudoseg.consistency_rampup_steps": 0},
    "decoder_labels": {"pseudoseg.pseudo_label_source": "decoder"},
    "distribution_alignment": {"pseudoseg.distribution_alignment": True},
    "debias": DEBIAS,
    "debias_image_labels": {**DEBIAS, "pseudoseg.weak_labels": True},
    "feature_perturbation": {"pseudoseg.feature_perturbation": "stream"},
    "feature_perturbation_strong": {"pseudoseg.feature_perturbation": "strong"},
    "claim_present_classes": {"pseudoseg.claim_present_classes": True},
    "claim_present_classes_image_labels": {"pseudoseg.claim_present_classes": True,
                                           "pseudoseg.weak_labels": True},
    "batch_stats_from_all": {"pseudoseg.batch_stats_from": "all"},
}


def fraction_value(name: str) -> float:
  numerator, _, denominator = name.partition("_")
  return int(numerator) / int(denominator)


def config_arg(args, run: dict) -> str:
  """configs/folder.py's arguments for one run."""
  items = {"root": args.root, "preset": args.preset, **run}
  if args.steps:
    items["steps"] = args.steps
  return "configs/folder.py:" + ",".join(f"{key}={value}" for key, value in items.items())


def one_run(args, name: str, fraction: str | None, seed: int, run: dict,
            options: dict | None = None) -> dict | None:
  """fraction None: every train image labeled (the ceiling). `options`: config fields to set."""
  overrides = {"seed": seed, "data.ignore_label": args.ignore_label, **(options or {})}
  if fraction is not None:
    overrides.update({"data.labeled_fraction": fraction_value(fraction),
                      "data.split_seed": seed})
  workdir = os.path.join(args.out, f"{fraction or 'all'}", run_name(name, seed))
  return train_run(workdir, name, config_arg(args, run), overrides, seed=seed,
                   report_only=args.report_only)


def table_lines(table: dict, args) -> list[str]:
  lines = [f"{os.path.basename(os.path.normpath(args.root))}, configs/folder.py preset="
           f"{args.preset}; val mIoU (%), mean ± std over seeds (runs); pseudo-label accuracy is "
           "class-balanced, against the unlabeled images' hidden masks", "",
           "| labeled | run | seeds | val mIoU | gain over supervised | accuracy of pseudo labels "
           "| minutes per run |", "|---|---|---|---|---|---|---|"]
  for (fraction, name), runs in table.items():
    supervised = table.get((fraction, "supervised"), [])
    gain = "-"
    if name != "supervised" and supervised and len(supervised) == len(runs):
      gain = summarize([r["val/miou"] - s["val/miou"] for r, s in zip(runs, supervised)])
    accuracy = [r["pseudo_accuracy"] for r in runs if r.get("pseudo_accuracy") is not None]
    minutes = [r["wall_clock_minutes"] for r in runs if r.get("wall_clock_minutes")]
    lines.append("| " + " | ".join([
        fraction.replace("_", "/") if fraction != "all" else "all", name, str(len(runs)),
        summarize([r["val/miou"] for r in runs]), gain,
        summarize(accuracy) if accuracy else "-",
        f"{statistics.mean(minutes):.1f}" if minutes else "-"]) + " |")
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--root", required=True,
                      help="The folder dataset, e.g. a copy of stanford_background.")
  parser.add_argument("--ignore_label", type=int, default=15)
  parser.add_argument("--fractions", default="1_32,1_8")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--preset", default="cpu")
  parser.add_argument("--steps", type=int, default=0, help="0: the preset's.")
  parser.add_argument("--ceiling_seeds", default=None,
                      help="Seeds of the all-labeled run (default: the first of --seeds).")
  parser.add_argument("--skip_ceiling", action="store_true")
  parser.add_argument("--runs", default=",".join(RUN_FLAGS),
                      help=f"Comma-separated, of {', '.join(RUN_FLAGS)}: the rows to train.")
  parser.add_argument("--ablations", default="",
                      help=f"Comma-separated, at the smallest fraction: {', '.join(ABLATIONS)}.")
  parser.add_argument("--report_only", action="store_true",
                      help="Tabulate the finished runs; train nothing.")
  args = parser.parse_args()
  args.out, args.root = os.path.abspath(args.out), os.path.abspath(args.root)
  fractions = args.fractions.split(",")
  seeds = [int(s) for s in args.seeds.split(",")]
  ceiling_seeds = ([] if args.skip_ceiling else
                   [int(s) for s in args.ceiling_seeds.split(",")] if args.ceiling_seeds
                   else seeds[:1])

  runs = [r for r in args.runs.split(",") if r]
  unknown = sorted(set(runs) - set(RUN_FLAGS))
  if unknown:
    parser.error(f"--runs: unknown {', '.join(unknown)}; known: {', '.join(RUN_FLAGS)}.")
  chosen_runs = {RUN_FLAGS[r] for r in runs}

  ablations = [a for a in args.ablations.split(",") if a]
  unknown = sorted(set(ablations) - set(ABLATIONS))
  if unknown:
    parser.error(f"--ablations: unknown {', '.join(unknown)}; known: {', '.join(ABLATIONS)}.")

  table = {}
  for seed in seeds:  # Seed-major: a partial benchmark has every row at the first seeds.
    for fraction in fractions:
      for name, run in SEMI_SUPERVISED_RUNS.items():
        if name not in chosen_runs or (name == WEAK_LABELS_ONLY_AT_SMALLEST
                                       and fraction != fractions[0]):
          continue
        table.setdefault((fraction, name), []).append(one_run(args, name, fraction, seed, run))
    for ablation in ablations:
      name = f"pseudoseg, {ablation}"
      table.setdefault((fractions[0], name), []).append(one_run(
          args, name, fractions[0], seed, SEMI_SUPERVISED_RUNS["pseudoseg"], ABLATIONS[ablation]))
    if seed in ceiling_seeds:
      table.setdefault(("all", "supervised"), []).append(
          one_run(args, "supervised", None, seed, SEMI_SUPERVISED_RUNS["supervised"]))

  table = {key: [r for r in runs if r is not None] for key, runs in table.items()}
  table = {key: runs for key, runs in table.items() if runs}
  text = "\n".join(table_lines(table, args))
  print(text)
  os.makedirs(args.out, exist_ok=True)  # --report_only on an empty --out still writes its table.
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({f"{fraction} {name}": [{k: r.get(k) for k in ("step", "val/miou", *PSEUDO_METRICS,
                                                             "wall_clock_minutes")}
                                      for r in runs]
               for (fraction, name), runs in table.items()}, f, indent=2)


if __name__ == "__main__":
  main()
