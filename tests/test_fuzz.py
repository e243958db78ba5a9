"""Fuzzing as a test: seeded mutations of a valid bundle, a run directory's state files and a recipe.

Each case runs the CLI in-process and must end in success or one ``error:`` line (exit 1 or 2):
never a traceback, never longer than 30 s (an alarm stops a hang), and the process's peak
resident memory may grow by at most 2 GiB over the whole test. The seed and the counts are
printed (``pytest -s`` shows them; a failure names the seed and the case). ``GENFW_FUZZ_CASES=N``
runs N cases per target instead of 200, ``GENFW_FUZZ_SEED=S`` another seed.
"""

import json
import os
import random
import resource
import shutil
import signal
import struct
import time
from pathlib import Path

import pytest
import yaml
from helpers import FastCliRunner
from test_hostile import RECIPE, save_bundle
from typer.testing import CliRunner

from genfw.cli import app

CASES = int(os.environ.get("GENFW_FUZZ_CASES", "200"))
SEED = int(os.environ.get("GENFW_FUZZ_SEED", "12"))
MAX_SECONDS = 30
MAX_RSS_GROWTH = 2 * 2**30

HOSTILE_VALUES = [None, True, -1, 0, 7, 2**31, 10**12, -(10**9), 1e308, 0.5, "", "x", "../../etc", [], [1, 2],
                  [[4, 4, 4]], {}, {"a": 1}, "prior.0", "tokenizer", "model"]


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, bytes (Linux reports KiB)


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"case ran longer than {MAX_SECONDS} s")


def run_case(argv: list[str], what: str) -> str:
    """Run one CLI command; 'ok' or 'error', or fail the test naming ``what``."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(MAX_SECONDS)
    t0 = time.perf_counter()
    try:
        result = FastCliRunner().invoke(app, argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - t0
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        detail = "".join(traceback.format_exception(result.exception))[-3000:]
        pytest.fail(f"{what}: uncaught {type(result.exception).__name__} after {seconds:.1f}s\n{detail}")
    assert "Traceback" not in result.output, f"{what}: traceback\n{result.output[-3000:]}"
    if result.exit_code == 0:
        return "ok"
    lines = [line for line in result.stderr.strip().splitlines() if line.strip() and line[0] not in "✓•"]
    assert result.exit_code in (1, 2), f"{what}: exit {result.exit_code}\n{result.output[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error:"), f"{what}: not one error line\n{result.stderr[-2000:]}"
    return "error"


def report(name: str, counts: dict[str, int], t0: float, rss0: int) -> None:
    growth = rss() - rss0
    print(f"fuzz {name}: seed {SEED}, {sum(counts.values())} cases: {counts.get('ok', 0)} succeeded, "
          f"{counts.get('error', 0)} refused in one line; {time.perf_counter() - t0:.1f}s, "
          f"peak RSS +{growth / 2**20:.0f} MiB")
    assert growth < MAX_RSS_GROWTH, f"peak resident memory grew by {growth / 2**30:.1f} GiB"


# --------------------------------------------------------------------------------------------
# mutations of a safetensors file


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_json(rng: random.Random, doc, depth: int = 0):
    """Replace, delete or add one value somewhere in a JSON document (in place; returns it)."""
    if isinstance(doc, dict) and doc and depth < 8 and rng.random() < 0.8:
        key = rng.choice(sorted(doc, key=str))
        r = rng.random()
        if r < 0.15:
            del doc[key]
        elif r < 0.3:
            doc[key] = rng.choice(HOSTILE_VALUES)
        else:
            doc[key] = mutate_json(rng, doc[key], depth + 1)
        return doc
    if isinstance(doc, list) and doc and depth < 8 and rng.random() < 0.8:
        i = rng.randrange(len(doc))
        r = rng.random()
        if r < 0.15:
            doc.pop(i)
        elif r < 0.25:
            doc.append(rng.choice(HOSTILE_VALUES))
        elif r < 0.4:
            doc[i] = rng.choice(HOSTILE_VALUES)
        else:
            doc[i] = mutate_json(rng, doc[i], depth + 1)
        return doc
    if isinstance(doc, bool) or doc is None:
        return rng.choice(HOSTILE_VALUES)
    if isinstance(doc, int):
        return rng.choice([doc * 1000, -doc, doc + 1, 0, 2**40, rng.choice(HOSTILE_VALUES)])
    if isinstance(doc, float):
        return rng.choice([float("inf"), -doc, doc * 1e6, 0.0, "1e999"])
    return rng.choice(HOSTILE_VALUES)


def mutate_safetensors(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """One mutation: byte flips, truncation, a header (tensor table) edit, a metadata edit, NaN bytes."""
    kind = rng.choice(["flip", "truncate", "header", "meta", "meta", "meta", "nan"])
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return kind, bytes(out)
    if kind == "truncate":
        return kind, data[: rng.randrange(len(data))]
    header, body = split(data)
    if kind == "header" and len(header) == 1:  # no tensors (the `pixels` tokenizer): edit the metadata
        kind = "meta"
    if kind == "header":
        key = rng.choice(sorted(k for k in header if k != "__metadata__"))
        entry = header[key]
        field = rng.choice(["dtype", "shape", "data_offsets"])
        if field == "dtype":
            entry["dtype"] = rng.choice(["F16", "I64", "BOOL", "F64", "U8", "BF16", "X9"])
        else:
            entry[field] = mutate_json(rng, entry[field])
        return kind, join(header, body)
    if kind == "meta":
        meta = json.loads(header["__metadata__"]["genfw"])
        header["__metadata__"]["genfw"] = json.dumps(mutate_json(rng, meta))
        return kind, join(header, body)
    # nan: overwrite 4 aligned bytes of a float tensor's data with NaN or inf
    floats = [v for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32" and v["data_offsets"][1] >
              v["data_offsets"][0]]
    if not floats:  # e.g. latent shards (integer codes): a flipped byte instead
        out = bytearray(data)
        out[rng.randrange(len(out))] ^= 0xFF
        return "flip", bytes(out)
    entry = rng.choice(floats)
    start, end = entry["data_offsets"]
    at = start + 4 * rng.randrange((end - start) // 4)
    out = bytearray(body)
    out[at : at + 4] = struct.pack("<f", rng.choice([float("nan"), float("inf"), -float("inf")]))
    return kind, join(header, bytes(out))


@pytest.fixture(scope="module")
def baseline_rss():
    return rss()


def test_fuzz_bundle(tmp_path, baseline_rss):
    base = save_bundle(tmp_path / "base.safetensors").read_bytes()
    run_case(["sample", str(tmp_path / "base.safetensors"), "-n", "2", "--out", str(tmp_path / "o")], "base bundle")
    counts: dict[str, int] = {}
    t0, rss0 = time.perf_counter(), rss()
    target = tmp_path / "b.safetensors"
    for i in range(CASES):
        rng = random.Random(f"bundle-{SEED}-{i}")
        kind, data = mutate_safetensors(rng, base)
        target.write_bytes(data)
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        outcome = run_case(["sample", str(target), "-n", "1", "--out", str(out)], f"bundle seed {SEED} case {i} ({kind})")
        counts[outcome] = counts.get(outcome, 0) + 1
    report("bundle", counts, t0, rss0)
    assert counts.get("error", 0) >= CASES // 4, "almost no mutation was refused: is the fuzzer mutating?"


# --------------------------------------------------------------------------------------------
# a run directory's state files


STATE_FILES = ["tokenizer/stage.json", "latents/stage.json", "prior0/stage.json", "prior0/train_state.safetensors",
               "latents/train/index.json", "latents/train/shard-00000.safetensors", "latents/holdout/index.json",
               "tokenizer/model.safetensors", "recipe.yaml"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run whose tokenizer and latent stages finished and whose prior stage resumes at its last step."""
    root = tmp_path_factory.mktemp("fuzz_run")
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    result = CliRunner().invoke(app, ["run", str(recipe), "--output-dir", str(root / "run"), "--stages",
                                      "tokenizer,latents,prior"])
    assert result.exit_code == 0, result.output
    stage = root / "run" / "prior0" / "stage.json"
    stage.write_text(stage.read_text().replace('"complete": true', '"complete": false'))
    (root / "run" / "prior0" / "model.safetensors").unlink()
    return recipe, root / "run"


def mutate_text(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """Byte flips, truncation, or a JSON/YAML value edit of a text file."""
    kind = rng.choice(["flip", "truncate", "edit", "edit"])
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return kind, bytes(out)
    if kind == "truncate":
        return kind, data[: rng.randrange(len(data))]
    doc = yaml.safe_load(data)
    return kind, json.dumps(mutate_json(rng, doc)).encode()


def test_fuzz_run_directory_state(tmp_path, run_dir, baseline_rss):
    recipe, base = run_dir
    work = tmp_path / "run"
    argv = ["run", str(recipe), "--output-dir", str(work), "--stages", "prior"]
    shutil.copytree(base, work)
    assert run_case(argv, "base run directory") == "ok"
    counts: dict[str, int] = {}
    t0, rss0 = time.perf_counter(), rss()
    for i in range(CASES):
        rng = random.Random(f"run-{SEED}-{i}")
        shutil.rmtree(work)
        shutil.copytree(base, work)
        name = rng.choice(STATE_FILES)
        path = work / name
        data = path.read_bytes()
        kind, data = (mutate_safetensors if name.endswith(".safetensors") else mutate_text)(rng, data)
        path.write_bytes(data)
        outcome = run_case(argv, f"run-dir seed {SEED} case {i} ({name}: {kind})")
        counts[outcome] = counts.get(outcome, 0) + 1
    report("run directory", counts, t0, rss0)


# --------------------------------------------------------------------------------------------
# recipes


def mutate_recipe(rng: random.Random, text: str) -> tuple[str, str]:
    kind = rng.choice(["flip", "truncate", "line", "edit", "edit", "alias"])
    if kind == "flip":
        chars = list(text)
        for _ in range(rng.randint(1, 4)):
            chars[rng.randrange(len(chars))] = chr(rng.choice([32, 10, 45, 58, 38, 42, 91, 123, 33, rng.randrange(32, 127)]))
        return kind, "".join(chars)
    if kind == "truncate":
        return kind, text[: rng.randrange(len(text))]
    if kind == "line":
        lines = text.splitlines()
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[i] = lines[j] if rng.random() < 0.5 else "  " + lines[i]
        return kind, "\n".join(lines)
    doc = yaml.safe_load(text)
    if kind == "alias":  # an alias bomb or a self-containing alias somewhere
        bomb = ("&a0 [x, x, x, x, x, x, x, x]\n" if rng.random() < 0.5 else "")
        return kind, f"zz: {bomb}" + text if bomb else "zz: &s [1, *s]\n" + text
    return kind, yaml.safe_dump(mutate_json(rng, doc))


def test_fuzz_recipe(tmp_path, baseline_rss):
    text = yaml.safe_dump(RECIPE)
    path = tmp_path / "r.yaml"
    counts: dict[str, int] = {}
    t0, rss0 = time.perf_counter(), rss()
    for i in range(CASES):
        rng = random.Random(f"recipe-{SEED}-{i}")
        kind, mutated = mutate_recipe(rng, text)
        path.write_text(mutated)
        outcome = run_case(["validate", str(path)], f"recipe seed {SEED} case {i} ({kind})")
        counts[outcome] = counts.get(outcome, 0) + 1
    report("recipe", counts, t0, rss0)
    assert counts.get("error", 0) >= CASES // 4


# --------------------------------------------------------------------------------------------
# lock files


LOCK_KINDS = ["json", "symlink", "json", "text", "dangling", "json", "directory", "fifo", "json", "empty"]


def mutate_lock(rng: random.Random, kind: str, path, victim) -> None:
    """Put a hostile ``run.lock`` of ``kind`` at ``path``: mutated holder JSON, garbage, a link, a folder, a FIFO."""
    import socket

    if kind == "json":
        holder = {"pid": rng.choice([os.getpid(), 1, 2**22 + 7, 0, -5]), "host": socket.gethostname(),
                  "proc_start": "123", "started": "2026-01-01T00:00:00+00:00", "command": "genfw run r.yaml"}
        path.write_text(json.dumps(mutate_json(rng, holder)))
    elif kind == "text":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))
    elif kind == "symlink":
        path.symlink_to(victim)
    elif kind == "dangling":
        path.symlink_to(victim.parent / "made-through-a-link")
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(b"")


def test_fuzz_lock_file(tmp_path, run_dir, baseline_rss):
    """A hostile run.lock: the run takes it over or refuses in one line, never writes through it or hangs."""
    recipe, base = run_dir
    work = tmp_path / "run"
    shutil.copytree(base, work)
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file\n")
    argv = ["run", str(recipe), "--output-dir", str(work), "--stages", "tokenizer"]
    counts: dict[str, int] = {}
    t0, rss0 = time.perf_counter(), rss()
    for i in range(max(1, CASES // 10)):  # each case is a whole (reusing) run: a tenth of the cases
        rng = random.Random(f"lock-{SEED}-{i}")
        lock = work / "run.lock"
        kind = LOCK_KINDS[i % len(LOCK_KINDS)]
        mutate_lock(rng, kind, lock, victim)
        outcome = run_case(argv, f"lock seed {SEED} case {i} ({kind})")
        counts[outcome] = counts.get(outcome, 0) + 1
        assert victim.read_text() == "the user's file\n", f"lock seed {SEED} case {i} ({kind}): wrote through a link"
        assert not (tmp_path / "made-through-a-link").exists(), f"lock case {i} ({kind}): wrote through a link"
        if kind in ("symlink", "dangling", "fifo", "directory"):
            assert outcome == "error", f"lock seed {SEED} case {i} ({kind}): taken"
        if os.path.isdir(lock) and not os.path.islink(lock):
            os.rmdir(lock)
        elif os.path.lexists(lock):
            os.unlink(lock)
    report("lock file", counts, t0, rss0)


# --------------------------------------------------------------------------------------------
# CSV metric names


HOSTILE_TAGS = ["step", "Step", "step ", "", " ", "a\nb", "a\r\nb", "\r", "a,b", 'a"b', '"', "'", "a\tb", "#x",
                "=1+1", "loss/main", "lr", "é/ü", "\x00", "\x1b[31mred", "x" * 300, "1", "-1", "nan", "metric/step",
                "a\\nb", "\ufeffbom", "\u2028sep"]


def test_fuzz_csv_metric_names(tmp_path, baseline_rss):
    """Hostile tags over resumes and continues: log.csv stays one header and one row per step, each read back."""
    import csv

    from genfw_loggers.files import CSV

    counts: dict[str, int] = {}
    t0, rss0 = time.perf_counter(), rss()
    for i in range(max(1, CASES // 8)):  # each case several logger sessions: an eighth of the cases
        rng = random.Random(f"csv-{SEED}-{i}")
        folder = tmp_path / f"c{i}"
        expected: dict[int, dict[str, float]] = {}
        saved = 0
        for _session in range(rng.randint(1, 4)):
            start = saved + 1 - (rng.randint(0, saved) if rng.random() < 0.3 else 0)  # an interrupted one re-logs
            expected = {s: v for s, v in expected.items() if s < start}
            logger = CSV(directory=str(folder), start_step=start)
            step = start - 1
            for _ in range(rng.randint(1, 5)):
                step += rng.randint(1, 3)
                tags = rng.sample(HOSTILE_TAGS, rng.randint(1, 4))
                values = {t: float(rng.randint(-9, 9)) for t in tags}
                logger.log_scalars(step, values)
                expected[step] = values
            logger.close()
            saved = step
        with open(folder / "log.csv", newline="") as f:
            rows = list(csv.reader(f))
        what = f"csv seed {SEED} case {i}"
        assert rows[0][0] == "step" and len(set(rows[0])) == len(rows[0]), f"{what}: header {rows[0]!r}"
        assert all(len(r) == len(rows[0]) for r in rows), f"{what}: ragged rows"
        steps = [int(r[0]) for r in rows[1:]]
        assert steps == sorted(expected), f"{what}: steps {steps} != {sorted(expected)}"
        for row in rows[1:]:
            got = sorted(float(v) for v in row[1:] if v != "")
            assert got == sorted(expected[int(row[0])].values()), f"{what}: step {row[0]}: {row!r}"
        counts["ok"] = counts.get("ok", 0) + 1
    report("csv metric names", counts, t0, rss0)
# converter hyper-parameter files

CONVERTERS = Path(__file__).parents[1] / ".." / "shared" / "converters"
# (converter, checkpoint, its hyper-parameter file, extra flags): the checkpoints of test_convert.py
CONVERTER_TARGETS = [
    ("sundae", "sv/checkpoint-0000002.pt", "sv/config.json", []),
    ("unleashing", "ut/absorbing_ema_2000.th", "ut/absorbing_hparams.json", []),
    ("vqvae2", "rv/vqvae_001.pt", "rv/vqvae_config.json", ["--resolution", "32"]),
]


@pytest.mark.skipif(not CONVERTERS.is_dir(), reason=f"converter fixtures not found at {CONVERTERS}")
def test_fuzz_converter_config(tmp_path, baseline_rss):
    """Mutated hyper-parameter files (values replaced, deleted, hostile; bytes flipped, cut) given to
    `genfw convert` with a real checkpoint: converted, or refused in one line."""
    counts: dict[str, int] = {}
    t0, rss0 = time.perf_counter(), rss()
    for i in range(max(3, CASES // 8)):  # 25 by default: about 4 s
        rng = random.Random(f"converter-{SEED}-{i}")
        name, ckpt, config, flags = CONVERTER_TARGETS[i % len(CONVERTER_TARGETS)]
        text = (CONVERTERS / config).read_bytes()
        if rng.random() < 0.7:
            kind, mutated = "edit", json.dumps(mutate_json(rng, json.loads(text))).encode()
        else:
            kind, mutated = mutate_text(rng, text)
        path = tmp_path / f"c{i}.json"
        path.write_bytes(mutated)
        out = tmp_path / f"o{i}.safetensors"
        outcome = run_case(["convert", name, str(CONVERTERS / ckpt), "--config", str(path), *flags, "-o", str(out)],
                           f"converter config seed {SEED} case {i} ({name}, {kind})")
        counts[outcome] = counts.get(outcome, 0) + 1
        out.unlink(missing_ok=True)
    report("converter config", counts, t0, rss0)
    assert counts.get("error", 0) >= 1
