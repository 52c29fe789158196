"""`maskpot generate corpus`: conditions per trajectory from (seed, index), two flexible water models
(TIP3P, SPC/Fw from our XML), periodic boxes or clusters, one extxyz per trajectory written atomically,
resumable, bit-reproducible; bad conditions are one line and exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest

from data_shards.corpus.conditions import CorpusConfig, draw, plan
from data_shards.corpus.generate import CORPUS_FILE, generate_corpus
from data_shards.readers import read_frames

REPO = Path(__file__).resolve().parents[2]
SMALL = {"frames_per_trajectory": 3, "molecules": (8, 12), "steps_between_frames": 10, "equilibration_steps": 20}


def mean_oh(path: Path) -> float:
    frames = ase.io.read(path, ":")
    d = []
    for atoms in frames:
        for o in range(0, len(atoms), 3):
            d += [atoms.get_distance(o, o + k, mic=any(atoms.pbc)) for k in (1, 2)]
    return float(np.mean(d))


def test_conditions_are_a_function_of_seed_and_index_only():
    cfg = CorpusConfig(trajectories=20, seed=5)
    trajs = plan(cfg)
    assert trajs[7] == draw(CorpusConfig(trajectories=8, seed=5), 7)     # same whatever the count
    assert trajs != plan(CorpusConfig(trajectories=20, seed=6))
    assert {t.model for t in trajs} == {"tip3p", "spcfw"}
    assert all(250 <= t.temperature_k <= 450 and 0.9 <= t.density_g_cm3 <= 1.1 and 32 <= t.molecules <= 128
               for t in trajs)


def test_generation_is_reproducible_resumable_and_covers_both_models(tmp_path):
    cfg = CorpusConfig(trajectories=3, seed=1, **SMALL)
    first = generate_corpus(cfg, tmp_path / "a", use_ray=False, progress=False)
    files = {p.name: p.read_bytes() for p in sorted((tmp_path / "a").glob("traj-*.extxyz"))}
    assert len(files) == 3 and first["last_run"]["frames"] == 9
    for name in files:   # every file is a valid labelled corpus for the readers
        assert len(read_frames(tmp_path / "a" / name)) == 3
    again = generate_corpus(cfg, tmp_path / "b", use_ray=False, progress=False)
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "b").glob("traj-*.extxyz"))} == files
    assert again["trajectories"] == first["trajectories"]
    # a killed run: one trajectory missing and a partial temporary file left behind
    (tmp_path / "a" / "traj-000001.extxyz").unlink()
    (tmp_path / "a" / ".traj-000001.extxyz.tmp-123-abcd").write_text("partial")
    resumed = generate_corpus(cfg, tmp_path / "a", use_ray=False, progress=False)
    assert resumed["last_run"]["trajectories"] == 1 and resumed["last_run"]["frames"] == 3
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "a").glob("traj-*.extxyz"))} == files
    assert not list((tmp_path / "a").glob(".traj-*"))
    with pytest.raises(ValueError, match="other settings"):
        generate_corpus(CorpusConfig(trajectories=3, seed=2, **SMALL), tmp_path / "a", use_ray=False, progress=False)


def test_spcfw_and_tip3p_geometries_and_clusters(tmp_path):
    out = {}
    for model in ("tip3p", "spcfw"):
        cfg = CorpusConfig(trajectories=1, models=(model,), periodic=False, temperature_k=(250.0, 250.0), **SMALL)
        record = generate_corpus(cfg, tmp_path / model, use_ray=False, progress=False)
        assert model in record["last_run"]["cost_per_frame"]
        path = tmp_path / model / "traj-000000.extxyz"
        frames = read_frames(path)
        assert not frames[0].pbc.any() and np.allclose(frames[0].cell, 0)
        out[model] = mean_oh(path)
    assert 0.93 < out["tip3p"] < 0.99 and 0.99 < out["spcfw"] < 1.05, out    # r0 0.9572 Å vs 1.012 Å


@pytest.mark.parametrize("args, setting", [
    (["--density-range", "-1", "1"], "density_g_cm3"),
    (["--temperature-range", "0", "300"], "temperature_k"),
    (["--temperature-range", "300", "900"], "temperature 900 K is outside"),
    (["--models", "tip3p", "--molecules-range", "9", "3"], "molecules range"),
])
def test_bad_conditions_are_one_line_exit_2_before_any_work(tmp_path, args, setting):
    proc = subprocess.run([sys.executable, "-m", "maskpot.cli", "generate", "corpus", "--out", str(tmp_path / "o"),
                           "--serial", *args], check=False, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and setting in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_ray_in_process_gives_the_serial_bytes(tmp_path):
    cfg = CorpusConfig(trajectories=2, seed=3, **SMALL)
    generate_corpus(cfg, tmp_path / "serial", use_ray=False, progress=False)
    record = generate_corpus(cfg, tmp_path / "ray", num_cpus=2, progress=False)
    assert record["last_run"]["trajectories"] == 2
    for p in sorted((tmp_path / "serial").glob("traj-*.extxyz")):
        assert (tmp_path / "ray" / p.name).read_bytes() == p.read_bytes()
    assert json.loads((tmp_path / "ray" / CORPUS_FILE).read_text())["results"][1]["frames"] == 3
