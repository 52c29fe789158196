"""`generate tip3p`, `shards build|reshard|inspect|verify` and `data fetch|list` sub-commands
(also `python -m data_shards …`).

Handlers are `func(args) -> int`. User errors are ValueError subclasses; the top-level CLI prints them
as one line without a traceback.
"""
from __future__ import annotations

import argparse
import logging

from data_shards.cli_errors import exit_2_on_user_error
from data_shards.corpus.cli import add_command as add_corpus_command
from data_shards.fetch import add_command as add_data
from data_shards.keys import CHEMICAL_SYMBOLS
from data_shards.manifest import (
    MANIFEST_DIR,
    QUARANTINE_NAME,
    SPLITS,
    dataset_entries,
    load_manifest,
)
from data_shards.units import UNITS
from data_shards.verify import verify_all


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _generate_tip3p(args) -> int:
    from data_shards.tip3p import generate_tip3p  # startup: OpenMM + ase (+3 s) off the maskpot CLI start

    _setup_logging()
    path = generate_tip3p(args.out, n_molecules=args.molecules, n_frames=args.frames, seed=args.seed,
                          steps_between_frames=args.steps_between_frames, temperature=args.temperature)
    print(f"wrote {args.frames} frames of {args.molecules} TIP3P waters to {path}")
    return 0


def _build(args) -> int:
    from data_shards.build import build_shards  # startup: imports torch (+7 s); kept off the maskpot CLI start

    _setup_logging()
    manifest = build_shards(args.inputs, args.out, shard_size=args.shard_size,
                            split_fractions=tuple(args.split_fractions), ray_address=args.ray_address,
                            num_cpus=args.num_cpus, require_labels=not args.no_labels, use_ray=not args.serial,
                            stats_cutoff=args.stats_cutoff, units=args.units, split_by=args.split_by,
                            split_seed=args.split_seed, split_mode=args.split_mode, energy_key=args.energy_key,
                            forces_key=args.forces_key, stress_key=args.stress_key,
                            datasets=tuple(args.datasets or ()), e0s=tuple(args.e0s or ()))
    splits = ", ".join(f"{s} {manifest['splits'][s]['samples']}" for s in SPLITS)
    totals = manifest["totals"]
    print(f"wrote {len(manifest['shards'])} shards ({splits} samples) to {manifest[MANIFEST_DIR]}; "
          f"{totals['quarantined']} of {totals['frames_read']} frames quarantined"
          + (f" (see {QUARANTINE_NAME})" if totals["quarantined"] else "")
          + f", {totals['duplicates']} duplicates left out"
          + (f", {totals['isolated_atoms']} isolated-atom E0 frames set aside" if totals.get("isolated_atoms") else ""))
    for name, d in dataset_entries(manifest).items():
        e0 = ", ".join(f"{_symbol(z)} {v:.4f}" for z, v in sorted(d["e0"].items())) or "n/a"
        print(f"  data set {name}: {d['samples']} samples, E0 [eV] ({d['e0_source']}) {e0}")
    return 0


def _symbol(z: str) -> str:
    return CHEMICAL_SYMBOLS[int(z)]


def _reshard(args) -> int:
    from data_shards.reshard import reshard  # startup: imports torch (+7 s); kept off the maskpot CLI start

    _setup_logging()
    m = reshard(args.src, args.dst, num_shards=args.num_shards, max_shard_bytes=args.max_shard_bytes)
    splits = ", ".join(f"{s} {m['splits'][s]['shards']}" for s in SPLITS)
    print(f"wrote {len(m['shards'])} shards ({splits}) with {m['totals']['samples_written']} samples to "
          f"{m[MANIFEST_DIR]}")
    return 0


def _fmt(value, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.6g}{unit}"


def _inspect(args) -> int:
    m = load_manifest(args.dir)
    t = m["totals"]
    print(f"{m[MANIFEST_DIR]}: schema {m['schema_version']}, maskpot {m.get('maskpot_version')}, "
          f"labelled {m.get('labelled')}")
    print(f"frames read {t['frames_read']}, samples written {t['samples_written']}, quarantined {t['quarantined']}, "
          f"duplicates {t.get('duplicates', 0)}")
    for e in m.get("duplicates", {}).get("examples", [])[:3]:
        print(f"  duplicate {e['key']}: {e['again']} repeats {e['first']}")
    for split in SPLITS:
        s = m["splits"][split]
        print(f"  {split:5s} {s['samples']:8d} samples in {s['shards']} shards")
    for inp in m.get("inputs", []):
        print(f"  input {inp['path']} ({inp['format']}, {inp['frames']} frames, split {inp['split']})")
    print("elements (atoms): " + ", ".join(f"Z={z}: {n}" for z, n in m.get("elements", {}).items()))
    st = m.get("stats", {})
    if st:
        e0 = ", ".join(f"Z={z}: {v:.6f}" for z, v in st["e0"].items()) or "n/a"
        print(f"stats ({st['split']}, {st['structures']} structures): E0 [eV] {e0}"
              + (" (rank deficient: minimum-norm split)" if st["e0_rank_deficient"] else ""))
        print(f"  energy per atom after E0: mean {_fmt(st['energy_per_atom_mean'], ' eV')}, "
              f"std {_fmt(st['energy_per_atom_std'], ' eV')}")
        per_z = ", ".join(f"Z={z}: {v:.4f}" for z, v in st["force_rms_per_element"].items())
        print(f"  force RMS {_fmt(st['force_rms'], ' eV/Å')}" + (f" ({per_z})" if per_z else ""))
    for name, d in (m.get("datasets") or {}).items():
        e0 = ", ".join(f"{_symbol(z)} {v:.4f}" for z, v in sorted(d["e0"].items(), key=lambda i: int(i[0]))) or "n/a"
        print(f"  data set {name}: {d['samples']} samples, E0 [eV] ({d['e0_source']}) {e0}; energy per atom after "
              f"E0 mean {_fmt(d['energy_per_atom_mean'], ' eV')}, std {_fmt(d['energy_per_atom_std'], ' eV')}")
    sr = m.get("structure")
    if sr:
        hist = ", ".join(f"{n}: {c}" for n, c in sr["natoms_histogram"].items())
        print(f"structures: {sr['periodicity']}; mean neighbours within {sr['cutoff']:g} Å "
              f"{_fmt(sr['mean_neighbours'])}; atoms per structure (count) {hist}")
    return 0


def _verify(args) -> int:
    problems, samples = verify_all(args.dir)
    for line in problems:
        print(line)
    n = len(load_manifest(args.dir, check_files=False)["shards"])
    if problems:
        print(f"{len(problems)} problem(s) in {n} shards")
        return 1
    print(f"all {n} shards match the manifest (sha256 and size); all {samples} samples decode and match "
          f"their checksums")
    return 0


def _add_generate(subparsers) -> None:
    gen = subparsers.add_parser("generate", help="generate a training corpus (flexible TIP3P water with OpenMM)")
    kinds = gen.add_subparsers(dest="corpus", metavar="CORPUS", required=True)
    p = kinds.add_parser("tip3p", help="flexible TIP3P water MD (OpenMM, PME, Langevin) → extxyz with energies "
                                       "[eV] and forces [eV/Å]")
    p.add_argument("--out", required=True, help="output folder for the extxyz corpus (created if missing)")
    p.add_argument("--molecules", type=_positive_int, default=64,
                   help="water molecules per periodic box (default: 64)")
    p.add_argument("--frames", type=_positive_int, default=100, help="frames to write (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="random seed for placement and velocities (default: 0)")
    p.add_argument("--steps-between-frames", type=_positive_int, default=100,
                   help="MD steps of 0.5 fs between written frames (default: 100 = 50 fs)")
    p.add_argument("--temperature", type=float, default=300.0,
                   help="thermostat temperature in K (default: 300)")
    p.set_defaults(func=_generate_tip3p)
    add_corpus_command(kinds, _positive_int)


def _add_shards(subparsers) -> None:
    shards = subparsers.add_parser("shards", help="build, reshard, inspect and verify WebDataset shards")
    actions = shards.add_subparsers(dest="action", metavar="ACTION", required=True)
    _add_shards_build(actions)
    _add_shards_reshard(actions)
    i = actions.add_parser("inspect", help="print a manifest's splits, totals, elements and statistics "
                                           "(E0 [eV], energy per atom [eV], force RMS [eV/Å])")
    i.add_argument("dir", metavar="DIR", help="shard folder holding manifest.json")
    i.set_defaults(func=_inspect)
    v = actions.add_parser("verify", help="re-hash every shard against the manifest and decode every sample "
                                          "(checksums); exit 1 on a problem")
    v.add_argument("dir", metavar="DIR", help="shard folder holding manifest.json")
    v.set_defaults(func=_verify)


def _add_shards_build(actions) -> None:
    """`shards build`: what to read, how to split it, where it runs."""
    b = actions.add_parser(
        "build", help="convert extxyz files / DeePMD folders into shard-NNNNNN.tar + manifest.json (Ray)",
        description="Inputs prefixed train=, val= or test= go wholly to that split; other inputs are cut in "
                    "frame order into contiguous train/val/test blocks by --split-fractions. Invalid frames "
                    "go to quarantine.jsonl and never stop the build. Rerunning into the same --out resumes an "
                    "interrupted build: shards whose sha256 matches their shard-NNNNNN.tar.json sidecar are kept.")
    b.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="extxyz file or DeePMD system/root folder, optionally prefixed train=, val= or test=")
    b.add_argument("--out", required=True, help="output folder for shards, manifest.json and quarantine.jsonl")
    b.add_argument("--shard-size", type=_positive_int, default=1000,
                   help="maximum frames per shard (default: 1000)")
    b.add_argument("--split-fractions", type=float, nargs=3, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions of each unprefixed input for train, val, test; must sum to 1 "
                        "(default: 0.8 0.1 0.1)")
    b.add_argument("--split-by", choices=["frames", "input"], default="frames",
                   help="how unprefixed inputs are divided: frames = contiguous blocks of every input; input = "
                        "whole inputs (each file, and each system of a DeePMD folder, e.g. one trajectory or "
                        "seed) go to one split, filling the fractions of all frames (default: frames)")
    b.add_argument("--split-mode", choices=["contiguous", "shuffled"], default="contiguous",
                   help="with --split-by frames: contiguous blocks in frame order, or shuffled = each input's frames "
                        "permuted (seeded by --split-seed and the path) before the fractions are cut, so e.g. the "
                        "high-force frames of a small file do not all land in one split (default: contiguous)")
    b.add_argument("--split-seed", type=int, default=0,
                   help="with --split-by input: the seed of the order in which inputs fill the splits (a pure "
                        "function of the input paths as given, their sizes and this); with --split-mode shuffled: "
                        "the permutation's seed (default: 0)")
    b.add_argument("--ray-address", default=None,
                   help="join a running Ray cluster at HOST:PORT (from `ray start --head`); "
                        "default: start a local Ray runtime in this process")
    b.add_argument("--num-cpus", type=_positive_int, default=None,
                   help="CPUs (parallel chunk writers) for the local Ray runtime (default: all cores)")
    b.add_argument("--no-labels", action="store_true",
                   help="accept frames without energy/forces (default: frames without labels are quarantined)")
    b.add_argument("--serial", action="store_true",
                   help="write chunks one after another in this process, without Ray (default: use Ray)")
    _add_label_arguments(b)
    b.set_defaults(func=_build)


def _add_label_arguments(b) -> None:
    """`shards build` options on the labels: units, field names, data sets, their E0 and statistics."""
    b.add_argument("--units", choices=sorted(UNITS), default=None,
                   help="units of the inputs: angstrom_ev (Å, eV, eV/Å) or bohr_hartree (Bohr, Hartree, "
                        "Hartree/Bohr; converted). Frames with implausible magnitudes are quarantined with a hint "
                        "(default: each format's own, Å/eV except n2p2: Bohr/Hartree)")
    b.add_argument("--energy-key", default=None, metavar="FIELD",
                   help="per-frame field holding the energy [eV] in extxyz/ASE-db inputs, e.g. REF_energy for a "
                        "MACE file (default: what ASE finds: energy, or the calculator's energy)")
    b.add_argument("--forces-key", default=None, metavar="FIELD",
                   help="per-atom column holding the forces [eV/Å], e.g. REF_forces (default: forces)")
    b.add_argument("--stress-key", default=None, metavar="FIELD",
                   help="per-frame field holding the stress [eV/Å³], 9 numbers or 6 Voigt, e.g. REF_stress "
                        "(default: stress; optional label)")
    b.add_argument("--datasets", nargs="+", default=None, metavar="NAME",
                   help="one data-set name per input, in order: each data set has its own energy zero (E0) and "
                        "statistics (default: each input's folder name)")
    b.add_argument("--e0s", action="append", default=None, metavar="[NAME=]FILE",
                   help="isolated-atom reference energies [eV]: a YAML/JSON table {element: E0} or an extxyz of "
                        "isolated atoms (config_type=IsolatedAtom); NAME= applies it to one data set; repeatable "
                        "(default: isolated-atom frames in the inputs, else a least-squares fit per data set)")
    b.add_argument("--stats-cutoff", type=_positive_float, default=5.0,
                   help="radius in Å for the manifest's mean neighbour count (default: 5.0)")


def _add_shards_reshard(actions) -> None:
    r = actions.add_parser(
        "reshard", help="rewrite a shard set into a new shard count or size (same samples, same splits)",
        description="Samples are copied byte for byte in split order; the source's sha256 are checked while "
                    "reading. The new manifest keeps totals and statistics and records resharded_from.")
    r.add_argument("src", metavar="SRC", help="shard folder holding manifest.json")
    r.add_argument("dst", metavar="DST", help="new shard folder (created; must differ from SRC)")
    size = r.add_mutually_exclusive_group(required=True)
    size.add_argument("--num-shards", type=_positive_int, default=None,
                      help="shards per split, of near-equal sample counts (default: unset)")
    size.add_argument("--max-shard-bytes", type=_positive_int, default=None,
                      help="largest tar size in bytes; a single larger sample gets its own shard (default: unset)")
    r.set_defaults(func=_reshard)


def add_commands(subparsers) -> None:
    """Register `generate`, `shards` and `data` on the top-level parser's subparsers."""
    _add_generate(subparsers)
    _add_shards(subparsers)
    add_data(subparsers, _positive_int)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_shards",
                                     description="maskpot data commands (units: Å, eV, eV/Å)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_commands(sub)
    args = parser.parse_args(argv)
    return exit_2_on_user_error(f"{parser.prog} {args.command}", lambda: int(args.func(args) or 0))
