"""Figures read from a compiled XLA program's HLO text: how often each computation runs (while loops: their
known trip count), the bytes each collective moves, and the matmul FLOPs. Used by tools/plan.py.
"""

import math
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COMP_RE = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\(")
_ARRAY_RE = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_CALLEE_RE = re.compile(r"\b(body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES_RE = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _arrays(type_text: str) -> list[int]:
    """Byte sizes of the arrays in an HLO type such as `(f32[2,3]{1,0}, bf16[4]{0})`."""
    out = []
    for dtype, dims in _ARRAY_RE.findall(type_text):
        if dtype in _DTYPE_BYTES:
            out.append(math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dtype])
    return out


def _group_size(line: str, num_devices: int) -> int:
    """Devices in each replica group, from any of XLA's three spellings of `replica_groups`."""
    named = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\S*?\))?\s*\{([^}]*)\}", line)
    if named:  # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: the product of the listed axes
        sizes = {k: int(v) for k, v in re.findall(r"'(\w+)'=(\d+)", named.group(1))}
        return math.prod(sizes.get(a, 1) for a in re.findall(r"'(\w+)'", named.group(2)))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)  # [groups, size]<=[...]
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)  # {{0,1},{2,3}}
    if listed:
        return len(listed.group(1).split(","))
    return num_devices  # `replica_groups={}`: all devices


def _link_bytes(op: str, sizes: list[int], group: int) -> tuple[int, float]:
    """(payload bytes, bytes each device sends over its links with ring algorithms) of one collective."""
    if op == "collective-permute":
        payload = sizes[0]
        return payload, float(payload)
    if op == "all-gather":  # the result is the gathered array (the biggest one of a -start tuple)
        payload = max(sizes)
        return payload, payload * (group - 1) / group
    payload = sum(sizes)
    if op == "reduce-scatter":  # the result is one shard: each device sends (group - 1) shards
        return payload * group, float(payload * (group - 1))
    if op == "all-reduce":  # reduce-scatter + all-gather
        return payload, 2.0 * payload * (group - 1) / group
    return payload, payload * (group - 1) / group  # all-to-all


def parse_hlo(hlo_text: str) -> dict:
    """{computation: {"lines": [...], "times": runs per step}} of a compiled HLO module's text.

    Each computation runs as often as its callers run it; a while loop's body runs `known_trip_count` times
    per run of the loop (XLA records it for scans: the layer stack, the gradient accumulation). A loop
    without a known trip count counts once; "unknown_trip_counts" in the result says how many there were.
    (`compiled.cost_analysis()` counts every while body once, whatever its trip count: measured with 2 and
    4 layers, it gives the same FLOPs; hence this walk.)"""
    comps, current = {}, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMP_RE.match(line)
            if m and "=" not in line.split("(")[0]:
                current = m.group(1)
                comps[current] = {"lines": [], "entry": line.startswith("ENTRY"), "times": 0}
            continue
        if line.strip() == "}":
            current = None
            continue
        comps[current]["lines"].append(line)

    calls, unknown = {name: [] for name in comps}, 0  # caller -> [(callee, runs per run of the caller)]
    for name, comp in comps.items():
        for line in comp["lines"]:
            trip = 1
            if re.search(r"\swhile\(", line):
                m = _TRIP_RE.search(line)
                trip = int(m.group(1)) if m else 1
                unknown += m is None
            for kind, callee in _CALLEE_RE.findall(line):
                calls[name].append((callee, trip if kind == "body" else 1))
            for group in _BRANCHES_RE.findall(line):
                calls[name] += [(c.strip().lstrip("%"), 1) for c in group.split(",") if c.strip()]

    # Computations form a DAG: propagate run counts callers-first (Kahn's order).
    indegree = {name: 0 for name in comps}
    for name in comps:
        for callee, _ in calls[name]:
            if callee in indegree:
                indegree[callee] += 1
    for comp in comps.values():
        comp["times"] = 1 if comp["entry"] else 0
    queue = [n for n, d in indegree.items() if d == 0]
    while queue:
        name = queue.pop()
        for callee, factor in calls[name]:
            if callee in comps:
                comps[callee]["times"] += comps[name]["times"] * factor
                indegree[callee] -= 1
                if indegree[callee] == 0:
                    queue.append(callee)
    return {"computations": comps, "unknown_trip_counts": unknown}


def _instructions(comp: dict):
    """(name, result type text, opcode, the rest of the line) of each instruction of a computation."""
    for line in comp["lines"]:
        m = _INSTR_RE.match(line)
        if m:
            yield m.group(1), m.group(2), m.group(3), line[m.end():]


def collectives(parsed: dict, num_devices: int) -> dict:
    """{op: {"count", "payload_bytes", "link_bytes"}} per device and step (see `_link_bytes`)."""
    out = {op: {"count": 0, "payload_bytes": 0, "link_bytes": 0.0} for op in COLLECTIVES}
    for comp in parsed["computations"].values():
        for _, type_text, op, rest in _instructions(comp):
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base not in COLLECTIVES:
                continue
            sizes = _arrays(type_text)
            group = _group_size(rest, num_devices)
            if not sizes or (group == 1 and base != "collective-permute"):
                continue  # a collective within one device moves nothing
            payload, link = _link_bytes(base, sizes, group)
            out[base]["count"] += comp["times"]
            out[base]["payload_bytes"] += comp["times"] * payload
            out[base]["link_bytes"] += comp["times"] * link
    return out


def dot_flops(parsed: dict) -> int:
    """Matmul FLOPs per device and step of the compiled program: 2 x result elements x contracted size for
    every `dot`, times the runs of its computation (while bodies: their trip count)."""
    total = 0
    for comp in parsed["computations"].values():
        if not comp["times"]:
            continue
        types = {}
        for name, type_text, op, rest in _instructions(comp):
            types[name] = type_text
            if op != "dot":
                continue
            lhs = rest.split(",")[0].strip().lstrip("%").rstrip(")")
            lhs_dims = _dims(types.get(lhs, ""))
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
            if lhs_dims is None or contracting is None:
                raise ValueError(f"tools.plan: cannot read the dot {name!r} of the compiled HLO")
            k = math.prod(lhs_dims[int(i)] for i in contracting.group(1).split(",") if i)
            total += comp["times"] * 2 * math.prod(_dims(type_text) or ()) * k
    return total


def _dims(type_text: str):
    m = _ARRAY_RE.search(type_text)
    return None if m is None else tuple(int(d) for d in m.group(2).split(",") if d)
