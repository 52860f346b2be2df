"""JSON Schema (draft 2020-12) of the report ``rlhf-fast bench --json`` writes."""

from __future__ import annotations

RECORD = {
    "type": "object",
    "required": ["suite", "case", "label", "mode", "impl", "status"],
    "properties": {
        "suite": {"type": "string"},
        "case": {
            "type": "object",
            "required": ["n", "v", "dtype", "mode"],
            "properties": {"n": {"type": "integer", "minimum": 0},
                           "v": {"type": "integer", "minimum": 1},
                           "dtype": {"type": "string"}, "mode": {"type": "string"}},
        },
        "label": {"type": "string"},
        "mode": {"type": "string"},
        "impl": {"type": "string"},
        "status": {"enum": ["ok", "absent", "error"]},
        "reason": {"type": "string"},
        "median_ms": {"type": "number", "exclusiveMinimum": 0},
        "peak_extra_mib": {"type": "number", "minimum": 0},
        "useful_bytes": {"type": "integer", "minimum": 0},
        "bytes_formula": {"type": "string"},
        "gbps": {"type": "number", "minimum": 0},
        "frac_of_copy": {"type": "number", "minimum": 0},
        "speedup_vs_reference": {"type": "number", "exclusiveMinimum": 0},
        "memory_vs_reference": {"type": "number", "minimum": 0},
        "err_logp": {"type": "number", "minimum": 0},
        "err_entropy": {"type": "number", "minimum": 0},
        "err_loss": {"type": "number", "minimum": 0},
        "err_grad": {"type": "number", "minimum": 0},
        "err_adv": {"type": "number", "minimum": 0},
    },
    "allOf": [
        {"if": {"properties": {"status": {"const": "ok"}}},
         "then": {"required": ["median_ms", "peak_extra_mib", "useful_bytes", "gbps",
                               "frac_of_copy"]}},
        {"if": {"properties": {"status": {"enum": ["absent", "error"]}}},
         "then": {"required": ["reason"]}},
    ],
}

REPORT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "rlhf_fast benchmark report",
    "type": "object",
    "required": ["schema", "date", "command", "device", "device_type", "python", "torch",
                 "triton", "ceilings", "records"],
    "properties": {
        "schema": {"const": "rlhf_fast.bench/1"},
        "date": {"type": "string"},
        "command": {"type": "array", "items": {"type": "string"}},
        "device": {"type": "string"},
        "device_type": {"enum": ["cuda", "cpu"]},
        "driver": {"type": ["string", "null"]},
        "python": {"type": "string"},
        "torch": {"type": "string"},
        "triton": {"type": ["string", "null"]},
        "peers": {"type": "object", "additionalProperties": {"type": ["string", "null"]}},
        "ceilings": {
            "type": "object",
            "required": ["copy_gbps", "matmul_tflops"],
            "properties": {"copy_gbps": {"type": "number", "exclusiveMinimum": 0},
                           "matmul_tflops": {"type": "number", "exclusiveMinimum": 0}},
        },
        "records": {"type": "array", "items": RECORD},
    },
}
