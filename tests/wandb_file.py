"""Reading W&B's offline ``.wandb`` run files in tests."""

import json
import struct
from pathlib import Path


def wandb_records(path: Path) -> list:
    """Protobuf records of a ``.wandb`` file (wandb 0.31 ships no reader for them).

    The file is ``:W&B`` + magic 0xBEE1 + version 0, then a LevelDB log: 32 KiB blocks of
    chunks with a 7-byte header (CRC, little-endian length, type: 1 full, 2 first, 3 middle,
    4 last); a block tail shorter than a header is zero padding.
    """
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def run_contents(run_folder: Path) -> dict:
    """History rows, summary, defined metrics, config, id, group and tags of one offline run."""
    (wandb_file,) = run_folder.glob("run-*.wandb")
    found: dict = {"history": [], "summary": {}, "metrics": {}, "config": {}}
    for record in wandb_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            found["id"] = record.run.run_id
            found["group"] = record.run.run_group
            found["tags"] = list(record.run.tags)
            found["config"] |= {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            found["history"].append(row)
        elif kind == "summary":
            for item in record.summary.update:
                found["summary"][item.key or "/".join(item.nested_key)] = json.loads(
                    item.value_json
                )
        elif kind == "metric":
            metric = record.metric
            found["metrics"][metric.name or metric.glob_name] = metric.step_metric
    return found
