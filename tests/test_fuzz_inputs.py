"""Inputs from outside, fuzzed: run and node configs, manifests, image files and model updates.

A site's manifest, a coordinator's config and a peer's update are written by someone else. For every mutation
the property is the same: a clear one-line error (or a logged rejection) within a bounded time, through the
same entry points a user meets (the ``fedvision`` CLI in-process, the config schema, update validation) —
never a traceback from deep inside a library, never a hang, never a half-written file.

The mutations are drawn from a seeded generator, so a failure reproduces; raise FUZZ_CASES to search longer.
"""

from __future__ import annotations

import io
import math
import os
import random
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedvision.cli import main
from fedvision.config import NodeConfig, RunConfig
from fedvision.federation_cli import app_defaults
from fedvision.errors import ConfigError, UpdateRejected
from fedvision.federation import validate_update

CASES = int(os.environ.get("FUZZ_CASES", "60"))
SECONDS_PER_CASE = 10.0

NASTY_VALUES = [None, "", " ", "nan", "inf", "-1", "0", "1e309", -1, 0, 10**30, -(10**30), math.nan, math.inf,
                -math.inf, 1.5, True, False, [], [1, 2], {}, {"a": 1}, "fedavg; rm -rf /", "é\x00\udcff", "a" * 5000,
                "../../etc/passwd", "synthetic-derm:-1", "manifest:/nonexistent.csv", "by:nothing", "dirichlet:0"]


def _one_line_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run the CLI in-process; it must return (not raise) within the time bound, with at most one error line."""
    started = time.monotonic()
    code = main(argv)
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert elapsed < SECONDS_PER_CASE, f"{argv} took {elapsed:.1f}s"
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("fedvision: error:")]
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        assert len(errors) == 1, err
    return code, errors[0] if errors else ""


# -- configs --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schema", [RunConfig, NodeConfig])
def test_fuzzed_config_values_fail_with_one_line_naming_the_key(schema):
    rng = random.Random(1)
    keys = list(app_defaults()) if schema is RunConfig else ["data", "test-data", "state-dir", "site-name",
                                                             "epsilon-budget", "delta", "partition-id",
                                                             "num-partitions"]
    accepted = rejected = 0
    for _ in range(CASES * 4):
        key, value = rng.choice(keys), rng.choice(NASTY_VALUES)
        try:
            config = schema.from_mapping({key: value})
            if schema is RunConfig:  # derived views parse their strings too
                config.attacks(), config.class_names, config.sensitive_attributes
            accepted += 1
            # What is accepted is usable: finite numbers, text without control characters.
            for v in vars(config).values():
                assert not isinstance(v, float) or math.isfinite(v), (key, value)
                assert not isinstance(v, str) or not any(ord(c) < 32 for c in v), (key, value)
        except ConfigError as e:
            message = str(e)
            assert "\n" not in message and key in message, (key, value, message)
            rejected += 1
    assert rejected > 0 and accepted > 0  # nasty values are refused; the valid ones among them are taken


def test_fuzzed_unknown_keys_are_refused_with_a_suggestion():
    rng = random.Random(2)
    keys = list(app_defaults())
    for _ in range(CASES):
        key = rng.choice(keys)
        i = rng.randrange(len(key))
        typo = key[:i] + key[i + 1:]  # one character lost
        if typo.replace("_", "-") in keys or typo.strip("-") != typo:
            continue
        with pytest.raises(ConfigError, match=f"unknown key '{typo}'.*did you mean .*{key}"):
            RunConfig.from_mapping({typo: 1})


def test_bad_run_config_on_the_command_line_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    for item in ["lr=-1", "strategy=fedbest", "epsilon-budget=nan", "num-server-rounds=0", "delta=1.5",
                 "model=no_such_model", "max-update-norm=-3"]:
        code, error = _one_line_cli(["run", "--out", str(out), "--set", item], capsys)
        assert code == 2 and item.split("=")[0] in error
        assert not out.exists(), f"{item}: the run folder was created before the config was validated"


# -- manifests and image files ----------------------------------------------------------------------------
def _png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims huge dimensions (a decompression bomb's first bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def _bad_image(rng: random.Random) -> tuple[str, bytes | None]:
    good = _png()
    return rng.choice([
        ("zero length", b""),
        ("random bytes", bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 400)))),
        ("truncated", good[: rng.randint(8, len(good) - 13)]),  # IEND is the last 12 bytes
        ("flipped bytes", bytes(b ^ 0xFF if rng.random() < 0.05 else b for b in good)),
        ("huge dimensions", _png_claiming(100_000, 100_000)),
        ("text", b"path,label\nnot,an image\n"),
        ("directory", None),
    ])


def _write_manifest(folder: Path, rows: list[str], header: str = "path,label,sex") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        (folder / f"ok{i}.png").write_bytes(_png())
    path = folder / "manifest.csv"
    path.write_text("\n".join([header] + [f"ok{i}.png,{'ab'[i % 2]},F" for i in range(4)] + rows) + "\n")
    return path


def test_fuzzed_image_files_give_one_line_naming_the_file_or_are_skipped(tmp_path, capsys):
    rng = random.Random(3)
    for case in range(CASES // 2):
        folder = tmp_path / f"case{case}"
        kind, payload = _bad_image(rng)
        bad = folder / "bad.png"
        folder.mkdir(parents=True)
        if payload is None:
            bad.mkdir()
        else:
            bad.write_bytes(payload)
        manifest = _write_manifest(folder, ["bad.png,a,M"])
        code, error = _one_line_cli(["data", "inspect", f"manifest:{manifest}"], capsys)
        if kind != "flipped bytes":  # a few flipped bits can leave a decodable image
            assert code == 2, f"{kind}: accepted"
        if code == 2:
            assert "bad.png" in error and "row" in error, (kind, error)
        # --skip-bad: the same file is skipped and listed, the rest loads
        code, _ = _one_line_cli(["data", "inspect", "--skip-bad", f"manifest:{manifest}"], capsys)
        assert code == 0, kind


def test_fuzzed_manifests_give_one_line_naming_the_row_or_column(tmp_path, capsys):
    rng = random.Random(4)
    mutations = [
        lambda: ("path,label,sex", ["missing.png,a,F"]),
        lambda: ("path,label,sex", [",a,F"]),
        lambda: ("path,label,sex", ["ok0.png,,F"]),
        lambda: ("path,label,sex", ["ok0.png,a,F,extra,cells"]),
        lambda: ("path,label,sex", ['"unterminated,a,F']),
        lambda: ("file,label,sex", []),
        lambda: ("path,diagnosis,sex", []),
        lambda: ("path,label,sex", [f"{'x' * rng.randint(300, 5000)}.png,a,F"]),
        lambda: ("path,label,sex", ["/etc/passwd,a,F"]),
        lambda: ("path,label,sex", ["ok0.png,a,F"] * rng.randint(1, 3) + ["\x00\x01\x02"]),
        lambda: ("", []),
    ]
    for case in range(CASES // 2):
        header, rows = rng.choice(mutations)()
        manifest = _write_manifest(tmp_path / f"m{case}", rows, header=header)
        if header == "":
            manifest.write_bytes(b"" if rng.random() < 0.5 else b"\xff\xfe\x00garbage")
        code, error = _one_line_cli(["data", "inspect", f"manifest:{manifest}"], capsys)
        if code == 2:
            assert "manifest" in error or "row" in error or str(manifest) in error, error


# -- model updates ----------------------------------------------------------------------------------------
def test_fuzzed_updates_are_rejected_with_a_reason_or_accepted_when_valid():
    rng = np.random.default_rng(5)
    reference = {"conv.weight": np.zeros((4, 3, 3, 3), np.float32), "fc.bias": np.zeros(2, np.float32),
                 "steps": np.zeros((), np.int64)}
    outcomes = {"accepted": 0, "rejected": 0}
    for _ in range(CASES * 3):
        update = {k: v + (rng.normal(size=v.shape).astype(v.dtype) * 0.01 if v.dtype.kind == "f" else 0)
                  for k, v in reference.items()}
        key = rng.choice(list(update))
        mutation = rng.integers(8)
        if mutation == 0:
            update[key] = update[key].astype(np.float64)
        elif mutation == 1:
            update[key] = update[key].reshape(-1)[:-1] if update[key].size > 1 else np.zeros(3, update[key].dtype)
        elif mutation == 2 and update[key].dtype.kind == "f":
            update[key].flat[rng.integers(update[key].size)] = rng.choice([np.nan, np.inf, -np.inf])
        elif mutation == 3:
            del update[key]
        elif mutation == 4:
            update["injected"] = np.ones(3, np.float32)
        elif mutation == 5 and update[key].dtype.kind == "f":
            update[key] = update[key] * 1e6
        try:
            validate_update(reference, update, max_norm=100.0)
            outcomes["accepted"] += 1
        except UpdateRejected as e:
            assert "\n" not in str(e) and str(e)
            outcomes["rejected"] += 1
    assert outcomes["accepted"] > 0 and outcomes["rejected"] > 0
