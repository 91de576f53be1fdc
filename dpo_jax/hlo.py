"""What a compiled program holds, read from its optimized HLO text (`jax.stages.Compiled.as_text()`).

    module = hlo.parse(compiled.as_text())
    hlo.collectives(module)     {kind: Collective(count, sent bytes)} one device sends per execution
    hlo.cost(module)            XLA's cost analysis (flops, bytes accessed, ...) with every loop trip counted
    hlo.kernels(module)         {kernel name: count}: Pallas / Mosaic kernels (tpu_custom_call), cuDNN calls

Loops. A `while` body runs its trip count times: `known_trip_count` in its backend_config where XLA wrote one
(GPU, CPU), else read off its condition (`i < N` against a constant, the counter's start read from the while's
operand tuple), as a TPU executable needs. Scanned layers, chunked log-probs, gradient accumulation and the
context-parallel ring are all loops; XLA's own `Compiled.cost_analysis()` counts each body once (measured: a
4-layer scanned step reports 0.30 of its unscanned FLOPs), so `cost` runs XLA's HloCostAnalysis on every loop
body as a module of its own and multiplies.

Collectives. Bytes sent per device, from each collective's result (optimized HLO names operands without their
shapes) and its group size g (`replica_groups` in any of XLA's three spellings): a collective-permute sends its
result; an all-gather (g - 1) / g of its result; a reduce-scatter (g - 1) results; an all-reduce 2 (g - 1) / g of
its result (a ring all-reduce: a reduce-scatter, then an all-gather); an all-to-all (g - 1) / g. Async pairs are
counted at their start.

What XLA cannot see: a custom call's work (a Pallas kernel, cuDNN attention) is opaque to its cost analysis and
counts 0 FLOPs there; `kernels` lists what ran that way, so a caller can add the kernels' own count.
"""

from __future__ import annotations

import dataclasses
import math
import re

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
               "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+")
_OPCODE = re.compile(r"^(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.*?)\s([a-z][\w\-]*)\(")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")


@dataclasses.dataclass
class Instruction:
  name: str
  result: str  # the result type, e.g. 'bf16[4,256]{1,0}' or a tuple of them
  opcode: str
  text: str  # the whole instruction, continuation lines joined


@dataclasses.dataclass
class Computation:
  name: str
  text: str  # header to closing brace
  entry: bool
  instructions: list[Instruction]

  def find(self, name: str) -> Instruction | None:
    return next((i for i in self.instructions if i.name == name), None)


@dataclasses.dataclass
class Module:
  header: str  # the 'HloModule ...' line
  computations: dict[str, Computation]  # in text order

  @property
  def entry(self) -> Computation:
    return next(c for c in self.computations.values() if c.entry)


def parse(text: str) -> Module:
  """The computations and instructions of an HLO module's text (attributes that span lines stay together)."""
  header, computations, current, lines = "", {}, None, []
  for line in text.splitlines():
    if line.startswith("HloModule"):
      header = line
      continue
    m = _HEADER.match(line)
    if current is None:
      if m:
        current, lines = (m.group(2), bool(m.group(1))), [line]
      continue
    lines.append(line)
    if line.rstrip() == "}":
      computations[current[0]] = Computation(current[0], "\n".join(lines), current[1], _instructions(lines[1:-1]))
      current = None
  return Module(header, computations)


def _instructions(lines: list[str]) -> list[Instruction]:
  joined: list[str] = []
  for line in lines:
    if _INSTRUCTION.match(line) or not joined:
      joined.append(line.strip())
    else:  # a continuation line of a multi-line attribute (kernel metadata strings)
      joined[-1] += "\n" + line
  out = []
  for text in joined:
    m = _OPCODE.match(text)
    if m:
      out.append(Instruction(m.group(1), m.group(2), m.group(3), text))
  return out


def shape_bytes(type_text: str) -> float:
  """Bytes of every array in an HLO type string, e.g. '(f32[2,64]{1,0}, s32[64])' -> 576."""
  return sum(DTYPE_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for t, dims in re.findall(r"\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([\d,]*)\]", type_text))


def group_size(text: str, default: int) -> int:
  """Devices in each replica group of a collective instruction: '{{0,1},{2,3}}' -> 2, iota '[2,4]<=[8]' -> 4,
  mesh form "mesh['axis_0'=2,'axis_1'=4] ... {'axis_1'}" -> 4 (the product of the named axes); `default` when
  the instruction names no groups or an empty list (all devices)."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", text)
  if m:
    sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
    return math.prod(sizes.get(a, 1) for a in re.findall(r"'([^']+)'", m.group(2)))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", text)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([^}]*)\}", text)
  if m and m.group(1).strip():
    return len(m.group(1).split(","))
  return default


def _callees(inst: Instruction) -> list[tuple[str, str]]:
  """(attribute, computation) pairs this instruction calls."""
  found = [(kind, name) for kind, name in _CALLEE.findall(inst.text)]
  for branches in re.findall(r"branch_computations=\{([^}]*)\}", inst.text):
    found += [("branch", b.strip().lstrip("%")) for b in branches.split(",") if b.strip()]
  return found


def _constant(comp: Computation, name: str) -> int | None:
  inst = comp.find(name)
  if inst is not None and inst.opcode == "constant":
    m = re.search(r"constant\((-?\d+)\)", inst.text)
    return int(m.group(1)) if m else None
  return None


def _operands(inst: Instruction) -> list[str]:
  m = re.search(rf"\s{re.escape(inst.opcode)}\((.*?)\)(?:,|$)", inst.text)
  return re.findall(r"%([\w.\-]+)", m.group(1)) if m else []


def trip_count(module: Module, caller: Computation, loop: Instruction) -> int:
  """How many times the body of `loop` (a while in `caller`) runs; 1 if it cannot be read."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.text)
  if m:
    return int(m.group(1))
  cond_name = dict(_callees(loop)).get("condition")
  cond = module.computations.get(cond_name or "")
  if cond is None:
    return 1
  root = next((i for i in cond.instructions if i.text.startswith("ROOT")), None)
  if root is None or root.opcode != "compare":
    return 1
  direction = re.search(r"direction=(\w+)", root.text)
  a, b = (_operands(root) + [None, None])[:2]
  bound, counter, flipped = _constant(cond, b or ""), a, False
  if bound is None:
    bound, counter, flipped = _constant(cond, a or ""), b, True
  if bound is None or direction is None:
    return 1
  start = 0  # where the counter starts: its element of the while's operand tuple, if a constant there
  gte = cond.find(counter or "")
  index = re.search(r"index=(\d+)", gte.text) if gte is not None and gte.opcode == "get-tuple-element" else None
  operands = _operands(loop)
  init = caller.find(operands[0]) if operands else None
  if index and init is not None and init.opcode == "tuple":
    elements = _operands(init)
    if int(index.group(1)) < len(elements):
      start = _constant(caller, elements[int(index.group(1))]) or 0
  op = direction.group(1)
  if flipped:  # N > i is i < N
    op = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(op, op)
  trips = {"LT": bound - start, "LE": bound - start + 1, "NE": bound - start}.get(op)
  return max(int(trips), 0) if trips is not None else 1


def _walk(module: Module, visit) -> None:
  """Call `visit(computation, times)` for every computation reached from the entry, `times` the number of
  executions per run of the module: while bodies multiply by their trip count."""
  def go(comp: Computation, times: float, depth: int) -> None:
    if depth > 64:
      return
    visit(comp, times)
    for inst in comp.instructions:
      trips = trip_count(module, comp, inst) if inst.opcode == "while" else 1
      for kind, callee in _callees(inst):
        sub = module.computations.get(callee)
        if sub is not None:
          go(sub, times * (trips if kind == "body" else trips + 1 if kind == "condition" else 1), depth + 1)
  go(module.entry, 1.0, 0)


@dataclasses.dataclass
class Collective:
  count: float = 0.0  # executions per run (a collective in a loop body counts once per trip)
  sent: float = 0.0  # bytes one device sends per run (module docstring)


def collectives(module: Module | str, default_group: int = 1) -> dict[str, Collective]:
  """{kind: Collective} over `COLLECTIVES` for one execution of the module (module docstring); `default_group`
  is the group size of a collective that names no groups (all devices of the program)."""
  module = parse(module) if isinstance(module, str) else module
  totals = {kind: Collective() for kind in COLLECTIVES}

  def visit(comp: Computation, times: float) -> None:
    for inst in comp.instructions:
      kind = inst.opcode[:-len("-start")] if inst.opcode.endswith("-start") else inst.opcode
      if kind not in totals:
        continue
      result = shape_bytes(inst.result)
      if inst.opcode.endswith("-start") and inst.result.startswith("("):  # async: (operand, result[, context])
        parts = re.findall(r"\b[a-z]+\d*\[[\d,]*\]", inst.result)
        result = shape_bytes(parts[1]) if len(parts) > 1 else result
      g = group_size(inst.text, default_group)
      sent = {"collective-permute": result, "all-gather": result * (g - 1) / g, "reduce-scatter": result * (g - 1),
              "all-reduce": 2 * result * (g - 1) / g}.get(kind, result * (g - 1) / g)
      totals[kind].count += times
      totals[kind].sent += sent * times

  _walk(module, visit)
  return totals


def kernels(module: Module | str) -> dict[str, float]:
  """{kernel: executions per run} of the custom calls that are kernels: Pallas / Mosaic TPU kernels by their name
  (`splash_mha_fwd_segmented_no_residuals`, ...), cuDNN and Triton calls by target. XLA's own helpers (buffer
  allocation, index hints) are left out."""
  module = parse(module) if isinstance(module, str) else module
  found: dict[str, float] = {}

  def visit(comp: Computation, times: float) -> None:
    for inst in comp.instructions:
      if inst.opcode != "custom-call":
        continue
      target = re.search(r'custom_call_target="([^"]+)"', inst.text)
      target = target.group(1) if target else ""
      if target == "tpu_custom_call":
        name = re.sub(r"(\.\d+)+$", "", inst.name)
      elif target.startswith(("__cudnn", "__gpu$xla.gpu.triton", "__cublas")):
        name = target
      else:
        continue
      found[name] = found.get(name, 0.0) + times

  _walk(module, visit)
  return found


def _submodule_text(module: Module, root: Computation) -> str:
  """`root` and everything it calls as a module of its own, `root` its entry (stack-frame references dropped:
  the frame tables stay with the original)."""
  reached, stack = set(), [root.name]
  while stack:
    name = stack.pop()
    if name in reached or name not in module.computations:
      continue
    reached.add(name)
    stack += [callee for inst in module.computations[name].instructions for _, callee in _callees(inst)]
  partitions = re.search(r"num_partitions=\d+", module.header)
  parts = ["HloModule sub" + (", " + partitions.group(0) if partitions else "")]
  for name, comp in module.computations.items():
    if name in reached and name != root.name:
      parts.append(re.sub(r"^ENTRY\s+", "", comp.text))
  parts.append("ENTRY " + re.sub(r"^ENTRY\s+", "", root.text))
  return re.sub(r",?\s*stack_frame_id=\d+", "", "\n\n".join(parts))


def _xla_cost(text: str) -> dict[str, float] | None:
  """XLA's HloCostAnalysis of an HLO module's text, through jaxlib (private API: None where it is missing)."""
  try:
    import jax
    from jax._src.lib import _jax
    from jaxlib import _hlo
    return dict(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, _hlo.hlo_module_from_text(text)))
  except Exception:  # noqa: BLE001 (an API moved, or a module the parser refuses: report no cost, not a crash)
    return None


COST_KEYS = ("flops", "bytes accessed", "transcendentals")


def cost(module: Module | str) -> dict[str, float] | None:
  """XLA's cost analysis of one execution with each loop body counted once per trip: {'flops', 'bytes accessed',
  'transcendentals'} per device, or None where jaxlib's cost analysis is not reachable.

  XLA counts a while loop's body and condition once; for each loop, the body's own cost (its loops expanded the
  same way) times (trips - 1) is added to what XLA counted."""
  module = parse(module) if isinstance(module, str) else module
  memo: dict[str, dict[str, float] | None] = {}

  def once(comp: Computation) -> dict[str, float] | None:  # XLA's count of comp, inner loops once
    if comp.name not in memo:
      memo[comp.name] = _xla_cost(_submodule_text(module, comp))
    return memo[comp.name]

  def expanded(comp: Computation, depth: int = 0) -> dict[str, float] | None:
    base = once(comp)
    if base is None or depth > 16:
      return base
    total = {k: float(base.get(k, 0.0)) for k in COST_KEYS}
    for holder, inst in _direct_loops(module, comp):
      body = module.computations.get(dict(_callees(inst)).get("body", ""))
      if body is None:
        continue
      trips = trip_count(module, holder, inst)
      inner, flat = expanded(body, depth + 1), once(body)
      if inner is None or flat is None:
        return None
      for k in COST_KEYS:  # XLA counted the body once with its loops once; replace that by trips expanded bodies
        total[k] += trips * inner[k] - float(flat.get(k, 0.0))
    return total

  return expanded(module.entry)


def _direct_loops(module: Module, comp: Computation) -> list[tuple[Computation, Instruction]]:
  """(holder, while instruction) of the loops run by `comp` itself or by what it calls, not counting those inside
  another loop."""
  found, stack, seen = [], [comp.name], set()
  while stack:
    name = stack.pop()
    if name in seen or name not in module.computations:
      continue
    seen.add(name)
    holder = module.computations[name]
    for inst in holder.instructions:
      if inst.opcode == "while":
        found.append((holder, inst))
        continue
      stack += [callee for _, callee in _callees(inst)]
  return found
