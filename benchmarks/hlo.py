"""Reading XLA's compiled HLO text: its instructions and the FLOPs of its matrix products and convolutions.

A leaf module (only the standard library): ``benchmarks.impls`` counts each runner's matmul FLOPs with it
and ``benchmarks.profile`` attributes profiled time to ops with it, without importing each other.
"""

from __future__ import annotations

import collections
import math
import re

PROG = "rnnjax-bench profile"  # the prefix of its messages (the command it was written for)

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (\S+) ([\w\-]+)\(([^)]*)\)(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+) \((.*)\) -> .* \{$")
_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def _dims(shape: str) -> list[int]:
    m = _SHAPE.match(shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def parse_hlo(text: str) -> dict[str, dict]:
    """Instructions of a compiled module's text: ``name -> {opcode, shape, phase_hint, dots, calls}``.

    ``dots`` lists ``(M, K, N, flops)`` for each matmul the instruction
    runs (itself, or inside the fusion it calls); ``convs`` the FLOPs of each
    convolution it runs (Flax's and Haiku's ConvLSTM: XLA's own convolutions).
    """
    shapes: dict[str, str] = {}
    instructions: dict[str, dict] = {}
    computations: dict[str, list[str]] = collections.defaultdict(list)
    current = None
    for line in text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = head.group(1)
            for param in head.group(2).split(", "):
                if ": " in param:
                    name, shape = param.split(": ", 1)
                    shapes[name.strip()] = shape
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, opcode, operands, rest = m.groups()
        shapes[name] = shape
        op_name = re.search(r'op_name="([^"]*)"', rest)
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        instructions[name] = dict(name=name, opcode=opcode, shape=shape, op_name=op_name.group(1) if op_name else "",
                                  operands=[o.strip().lstrip("%") for o in operands.split(",") if o.strip()],
                                  rest=rest, calls=calls.group(1) if calls else None, computation=current)
        computations[current].append(name)

    def dot_of(ins) -> tuple[int, int, int, int]:
        out = math.prod(_dims(ins["shape"]))
        lhs = _dims(shapes.get(ins["operands"][0], ""))
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins["rest"])
        k = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i) if contracting and lhs else 0
        m_n = _dims(ins["shape"])
        n = m_n[-1] if m_n else 1
        return (out // n if n else 0, k, n, 2 * out * k)

    def conv_of(ins) -> int:
        """2 FLOPs per output element, window position and kernel input feature (the kernel's ``i``
        dimension, already divided by any feature groups); padded positions included."""
        window = re.search(r"window=\{size=([\dx]+)", ins["rest"])
        labels = re.search(r"dim_labels=[^_]+_([^-]+)->", ins["rest"])
        kernel = _dims(shapes.get(ins["operands"][1], ""))
        if labels is None or len(kernel) != len(labels.group(1)):
            raise ValueError(f"{PROG}: cannot read the kernel of the convolution {ins['name']}")
        inputs = kernel[labels.group(1).index("i")]
        volume = math.prod(int(k) for k in window.group(1).split("x")) if window else 1
        return 2 * math.prod(_dims(ins["shape"])) * volume * inputs

    for ins in instructions.values():
        inner = [instructions[i] for i in computations.get(ins["calls"], [])] if ins["calls"] else []
        ins["dots"] = [dot_of(i) for i in ([ins] if ins["opcode"] == "dot" else inner) if i["opcode"] == "dot"]
        ins["convs"] = [conv_of(i) for i in ([ins] if ins["opcode"] == "convolution" else inner)
                        if i["opcode"] == "convolution"]
    return instructions


def compiled_matmul_flops(text: str) -> int:
    """The FLOPs of every matrix product and convolution a compiled module runs (its optimised HLO text, after
    XLA's dead-code elimination): loop bodies times their known trip counts, the larger branch of a conditional."""
    if 'custom_call_target="rnnjax_rnn_' in text:
        raise ValueError(f"{PROG}: the program runs rnnjax's native kernels, whose products are not in its HLO")
    instructions = parse_hlo(text)
    own: dict[str, int] = collections.Counter()  # matmul FLOPs of each computation's own instructions
    for ins in instructions.values():
        own[ins["computation"]] += sum(d[3] for d in ins["dots"]) + sum(ins["convs"])
    # Control flow, which parse_hlo skips (tuple shapes): computation -> [(combine, callees, trips)].
    flow: dict[str, list] = collections.defaultdict(list)
    current = entry = None
    for line in text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = head.group(1)
            entry = current if line.startswith("ENTRY") else entry
            continue
        if " while(" in line:
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
            if trips is None:
                raise ValueError(f"{PROG}: a loop has no known trip count; expected only loops of static length "
                                 f"(lax.scan, fori_loop), got: {line.strip()[:120]}")
            flow[current].append((sum, [re.search(r"body=%([\w.\-]+)", line).group(1)], int(trips.group(1))))
        elif " call(" in line:
            flow[current].append((sum, [re.search(r"to_apply=%([\w.\-]+)", line).group(1)], 1))
        elif " conditional(" in line:
            branches = re.search(r"branch_computations=\{([^}]*)\}", line).group(1)
            flow[current].append((max, [b.strip().lstrip("%") for b in branches.split(",")], 1))

    def total(computation: str) -> int:
        return own[computation] + sum(trips * combine(total(c) for c in callees)
                                      for combine, callees, trips in flow[computation])

    return total(entry)
