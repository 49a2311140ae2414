"""Crafted tar headers cannot stall, crash or bloat the data: a member pointing back at
itself, pathological names, oversized or malformed extended headers, a dead indexing
process. Each shard that cannot be read ends alone, named; the rest of the data is used.
The cases that used to hang run in a subprocess under a deadline and a memory limit.

Run as a script (``python tests/test_data_tar_headers.py SCENARIO FOLDER``) it plays one
scenario in a fresh, memory-limited process and prints what it saw as JSON."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.tar_headers import MAX_EXTENDED_HEADER
from tests.helpers.processes import PY, REPO, kill_group, output_by_deadline, start_in_own_group
from tests.helpers.samples import FixedBatches, batch_captions, byte_tokens
from tests.helpers.tars import (archive, dotted_path, extended, member, member_header, pax_record,
                                pointing_back_at_itself, sample)

# address space of a scenario process, and of a dry run (torch and all): a header loop that
# grows memory dies, not the machine
MEMORY_LIMIT, DRY_RUN_MEMORY_LIMIT = 2 << 30, 8 << 30


# ---------------------------------------------------------------- scenarios, run in a fresh process

def _scenario_read_all(folder: str) -> dict:
    """Index the folder (two processes), then read every sample at random and every shard in order."""
    from data import read_samples
    from data.decode import BadSample
    from data.index_shards import main as index_main
    from data.tar_index import TarIndex

    index_main([folder, "--processes", "2"])
    index = TarIndex(Path(folder) / "index.json")
    read, bad = [], []
    for i in range(len(index)):
        try:
            read.append(index.members(i)["txt"].decode())
        except BadSample as exn:
            bad.append(exn.reason)
    shards = sorted(str(p) for p in Path(folder).glob("*.tar"))
    streamed = read_samples(shards)
    return {"random": read, "random_bad": bad, "streamed": [caption for _, caption in streamed],
            "streamed_skips": dict(streamed.skipped_reasons)}


def _run_scenario(name: str, folder: Path, timeout: float) -> subprocess.CompletedProcess:
    """The scenario in a fresh process; it must finish by the deadline (a hang is a failure)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = start_in_own_group([PY, __file__, name, str(folder)], env=env)  # killed with the indexing processes
    stalled = f"scenario {name} still running after {timeout} s: a reader is stalled"
    out, err = output_by_deadline(proc, timeout, stalled)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _results(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- 1: a member pointing back at itself

def test_a_member_pointing_back_at_itself_ends_its_shard_only(tmp_path):
    """tarfile walks that header forever, its memory growing: the scan, random access and
    streaming all stalled, and `--dry-run` over the folder never returned."""
    (tmp_path / "a_good.tar").write_bytes(archive(sample("g0", 0), sample("g1", 1)))
    (tmp_path / "b_loop.tar").write_bytes(archive(sample("l0", 2), pointing_back_at_itself(), sample("l1", 3)))
    proc = _run_scenario("read_all", tmp_path, timeout=120)
    seen = _results(proc)
    # l0 is dropped with the break (the sample being read when the tar broke may be incomplete)
    assert seen["random"] == ["caption g0", "caption g1"]
    assert seen["streamed"] == ["caption g0", "caption g1"]
    assert seen["streamed_skips"] == {"unreadable shard": 1}
    assert f"unreadable shard {tmp_path / 'b_loop.tar'}: a negative member size" in proc.stderr


def test_the_dry_run_over_a_folder_holding_it_returns_with_n(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    (folder / "a.tar").write_bytes(archive(*(sample(f"a{i}", i) for i in range(3))))
    (folder / "b.tar").write_bytes(archive(sample("b0", 0), pointing_back_at_itself()))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [PY, "-m", "trainer.train", "--config", "vip_own", f"data.shards={folder}", "ds.train_batch_size=2",
           "ds.train_micro_batch_size_per_gpu=2", "steps=50", "--dry-run"]
    proc = start_in_own_group(cmd, cwd=tmp_path, env=env, preexec_fn=_limit_memory)
    out, err = output_by_deadline(proc, 300, "the dry run is stalled")
    assert proc.returncode == 0, err[-3000:]
    assert "data: N = 3 examples (shards)" in out
    assert f"unreadable shard {folder / 'b.tar'}" in err


def test_a_dead_indexing_process_is_an_error_not_a_wait(tmp_path):
    """A pool worker killed (for memory, say) while reading: multiprocessing.Pool.map waits
    forever for its lost work. The shard here is a FIFO, which holds its reader until
    killed."""
    os.mkfifo(tmp_path / "a.tar")
    (tmp_path / "b.tar").write_bytes(archive(sample("b0", 0)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    code = ("import sys; from data.offset_tables import scan_shards; "
            f"scan_shards([{str(tmp_path / 'a.tar')!r}, {str(tmp_path / 'b.tar')!r}], processes=2)")
    proc = start_in_own_group([PY, "-c", code], env=env)
    workers = _children(proc, count=2)
    os.kill(workers[0], signal.SIGKILL)
    _, err = output_by_deadline(proc, 60, "the indexing waits forever for its dead process")
    assert proc.returncode != 0
    assert "ValueError: a header-reading process died (killed for lack of memory?)" in err
    assert str(tmp_path / "a.tar") in err


def _children(proc: subprocess.Popen, count: int, timeout: float = 60) -> list[int]:
    """The first ``count`` child processes of ``proc`` once they exist."""
    pid, deadline = proc.pid, time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            children = []
        if len(children) >= count:
            time.sleep(0.5)  # let them reach the shards
            return children
        time.sleep(0.05)
    kill_group(proc)
    pytest.fail(f"{count} indexing processes never started")


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (DRY_RUN_MEMORY_LIMIT, resource.RLIM_INFINITY))


# ---------------------------------------------------------------- 2: time and memory linear in the header

def test_long_names_and_pax_headers_cost_linear_time(tmp_path):
    """A 64 KiB name of dots took the member-name regex ~13 s (quadratic: an hour at 1 MB),
    and each loop splits it; 60 KiB of digits in a pax header are quadratic in CPython's
    own pax parsing. Each shard holds one such member between good samples."""
    limit = MAX_EXTENDED_HEADER
    (tmp_path / "a_long_pax.tar").write_bytes(archive(
        sample("p0", 0), extended(b"x", pax_record(b"path", dotted_path(limit - 20))), member_header("x.jpg", 0),
        sample("p1", 1)))
    (tmp_path / "b_long_gnu.tar").write_bytes(archive(
        sample("n0", 2), extended(b"L", dotted_path(limit)), member_header("y.jpg", 0), sample("n1", 3)))
    (tmp_path / "c_digits.tar").write_bytes(archive(
        sample("d0", 4), extended(b"x", b"1" * (limit - 4096)), member_header("z.jpg", 0), sample("d1", 5)))
    seen = _results(_run_scenario("read_all", tmp_path, timeout=30))
    assert seen["random"] == ["caption p0", "caption p1", "caption n0", "caption n1"]
    assert seen["streamed"] == ["caption p0", "caption p1", "caption n0", "caption n1"]


@pytest.mark.parametrize("kind", [b"x", b"L"])
def test_extended_headers_over_the_cap_are_refused_unread(tmp_path, kind):
    """A 1 MB pax path or GNU long name was read whole into memory: now its size alone ends
    the shard; the samples before it stay."""
    name = b"a/" * (2**19 - 4) + b"big.jpg"
    payload = pax_record(b"path", name) if kind == b"x" else name
    assert len(payload) > MAX_EXTENDED_HEADER
    just_under = pax_record(b"path", b"u" * (MAX_EXTENDED_HEADER - 100) + b".jpg") if kind == b"x" else \
        b"u" * (MAX_EXTENDED_HEADER - 10) + b".jpg"
    shard = tmp_path / "s.tar"
    shard.write_bytes(archive(sample("s0", 0), extended(kind, just_under), member_header("ignored", 0),
                              extended(kind, payload), member("ignored.jpg", b"x"), sample("s1", 1)))
    from data import read_samples
    from data.offset_tables import scan_sample_offsets

    # s0, then the sample named by the header under the cap, dropped with the break
    assert len(scan_sample_offsets(shard)) == 1
    reader = read_samples([shard])
    assert [caption for _, caption in reader] == ["caption s0"]
    assert reader.skipped_reasons == {"unreadable shard": 1}


# ---------------------------------------------------------------- 3: errors tarfile raises from deep inside

BAD_PAX = {  # what tarfile raised ValueError on -> why the shard is unreadable now
    "5000-digit record length": (b"9" * 5000 + b" path=x\n", "a malformed pax record length"),
    "non-numeric GNU.sparse.map": (pax_record(b"GNU.sparse.map", b"0,zero,1") + pax_record(b"GNU.sparse.major", b"0")
                                   + pax_record(b"GNU.sparse.minor", b"1"), "a sparse member"),
    "non-numeric size": (pax_record(b"size", b"12abc"), "a pax size that is not a number"),
    "5000-digit size": (pax_record(b"size", b"1" * 5000), "a pax size that is not a number"),
}


@pytest.mark.parametrize("payload, reason", BAD_PAX.values(), ids=BAD_PAX.keys())
def test_malformed_pax_headers_end_their_shard_at_indexing_and_when_read(tmp_path, payload, reason, caplog):
    """tarfile raised ValueError: at indexing the job stopped with a message naming no shard;
    with a shipped index, training crashed at the same step after every resume."""
    from data.loader import PoissonReader
    from data.offset_tables import table_path, write_table
    from data.shard_sets import index_shard_set
    from data.transform import ImageTextTransform

    folder = tmp_path / "shards"
    folder.mkdir()
    good, before = archive(sample("a0", 0), sample("a1", 1)), sample("b0", 2)
    (folder / "a.tar").write_bytes(good)
    (folder / "b.tar").write_bytes(archive(before, extended(b"x", payload), sample("b1", 3), sample("b2", 4)))
    with caplog.at_level("WARNING"):
        index = index_shard_set(folder)
    assert index.counts == [2, 0]  # b0 is dropped with the break
    assert f"unreadable shard {folder / 'b.tar'}: {reason}" in caplog.text

    # an index shipped with the shards, its table pointing at every sample's first header
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for name in ("a.tar", "b.tar"):
        (shipped / name).write_bytes((folder / name).read_bytes())
    b_offsets = [0, len(before), len(before) + len(extended(b"x", payload)) + len(sample("b1", 3))]
    (shipped / "index.json").write_text(json.dumps({"shardlist": [{"url": "a.tar", "nsamples": 2},
                                                                  {"url": "b.tar", "nsamples": 3}]}))
    write_table(table_path(shipped / "index.json"), [([0, len(sample("a0", 0))], len(good)),
                                                     (b_offsets, len((shipped / "b.tar").read_bytes()))])
    reader = PoissonReader(shipped / "index.json", FixedBatches([list(range(5))]),
                           ImageTextTransform(8, byte_tokens, 16))
    for _ in range(2):  # the same step again, as after a resume
        reader.load_state_dict({"next_step": 0})
        (batch,) = reader.micro_batches(0)
        assert batch_captions(batch) == ["caption a0", "caption a1", "caption b2"]
    assert dict(reader.skipped_reasons) == {"unreadable shard": 2}  # b0 is read up to the break, b1 from it


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, resource.RLIM_INFINITY))
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    scenario, where = sys.argv[1], sys.argv[2]
    print(json.dumps(globals()[f"_scenario_{scenario}"](where)))
