"""The mutation catalogue: deliberate one-line bugs the test suite must catch.

Each `Mutant` replaces the exact text `old` by `new` in one file (`scope`, when given,
limits the search to one top-level function: from the line starting with `scope` to the
next line that starts in column 0). `old` must occur exactly once (in the scope), else
the runner reports the mutant STALE and fails: the catalogue must follow the code. A
mutant is a realistic bug (an off-by-one, a wrong power, a dropped term, a check that
looks at the wrong thing), never a syntax or import error.

`tests` are the pytest targets that should catch it (files or node ids, narrowed with
the `-k` expression `k` where that keeps the run short: the kernel tests run in the
Triton interpreter); `python -m mutants --list` prints them.

Adding a feature? Add its mutants here (the gradient and backward work will), run
`python -m mutants --only ID` until each is caught, then `make mutants` for the docs.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mutant:
    id: str
    area: str
    file: str
    old: str
    new: str
    tests: tuple
    description: str
    k: str | None = None
    scope: str | None = None
    notes: str = field(default="", compare=False)

    def pytest_args(self) -> list[str]:
        return list(self.tests) + (["-k", self.k] if self.k else [])


ENGINE = "property_tests/test_engine.py"
GRADS = "property_tests/test_gradients.py"
CHAINS = "property_tests/test_kernel_chains.py"
REFS = "property_tests/test_references.py"
VALID = "property_tests/test_validation.py"
K2 = "property_tests/test_kernels.py"        # hla2 / ahla kernels (Triton interpreter)
K3 = "property_tests/test_kernels_hla3.py"   # hla3 kernels

SUMMARIES = "derivations/summaries.py"
WEIGHTS = "derivations/weights.py"
ALGEBRA = "derivations/algebra.py"
CODEGEN = "derivations/codegen.py"
RUNTIME = "hla_core/runtime.py"
ERRMODEL = "hla_core/error_model.py"
GLA = "kernels/gla.py"
COMMON = "kernels/_common.py"

CHUNK_KERNEL = "def _la_chunk_kernel("
SUMMARY_KERNEL = "def _la_summary_kernel("
RECURRENT_KERNEL = "def _la_recurrent_kernel("


CATALOGUE: list[Mutant] = [
    # ------------------------------------------------------------------ engine: summaries
    # (split / _admissible / _decompose: the synthesis of streaming updates and ⊕)
    Mutant(
        "split-drops-carry-term", "engine-summaries", SUMMARIES,
        'for assign in itertools.product(("A", b_seg), repeat=len(vars_)):',
        'for assign in list(itertools.product(("A", b_seg), repeat=len(vars_)))[1:]:',
        (CHAINS, ENGINE),
        "split skips the all-in-A assignment: the decayed previous state drops out of every "
        "update and every ⊕"),
    Mutant(
        "split-stream-decay-squared", "engine-summaries", SUMMARIES,
        'rho = GAMMA if one_token else RHO["B"]',
        'rho = GAMMA ** 2 if one_token else RHO["B"]',
        (CHAINS, ENGINE),
        "streaming updates decay the previous state by γ^(2c) instead of γ^c"),
    Mutant(
        "admissible-token-weak-as-strict", "engine-summaries", SUMMARIES,
        'if ga == gb and ga == token_seg and op == "<":',
        'if ga == gb and ga == token_seg and op == "<=":',
        (CHAINS, ENGINE),
        "_admissible rejects two indices tied at the new token under <= (and admits them "
        "under <): the token's own term k_t k_tᵀ q_t v_tᵀ goes missing"),
    Mutant(
        "decompose-one-way-components", "engine-summaries", SUMMARIES,
        "seg_of[b] == seg_of[a] and ((a, b) in rel or (b, a) in rel):",
        "seg_of[b] == seg_of[a] and (a, b) in rel:",
        (CHAINS, ENGINE),
        "_decompose joins indices into one component only along a -> b of the relation: an "
        "index related to an earlier-named one as b <= a (AHLA's j <= i) becomes an "
        "independent sum"),
    # ------------------------------------------------------------------ engine: combine ⊕
    Mutant(
        "combine-rho-squared", "engine-combine", SUMMARIES,
        'rho = GAMMA if one_token else RHO["B"]',
        'rho = GAMMA if one_token else RHO["B"] ** 2',
        (ENGINE,),
        "wrong ρ power in ⊕: segment A's summaries are decayed by ρ_B^(2c) instead of ρ_B^c"),
    Mutant(
        "combine-strict-end-in-any-segment", "engine-combine", SUMMARIES,
        "if g == last and g == token_seg:",
        "if g == last:",
        (ENGINE,),
        "_admissible: an index with x < end may not lie in segment B at all (only the single "
        "last token should be excluded): ⊕ of patterns with strict end relations drops terms"),
    Mutant(
        "combine-keeps-A-end-relations", "engine-combine", SUMMARIES,
        'seq = _decompose(s, seg_of, {b_seg}, namer, "T" if one_token else None)',
        'seq = _decompose(s, seg_of, {"A", b_seg}, namer, "T" if one_token else None)',
        (ENGINE,),
        "split keeps the end relations (x < end) for the components in segment A too, as if "
        "A ended where AB ends"),
    # ------------------------------------------------------------------ engine: proofs
    Mutant(
        "compare-ignores-decay", "engine-proofs", WEIGHTS,
        "fkey = tuple(sorted(form.items()))",
        "fkey = ()",
        (ENGINE,),
        "weights.compare merges all decay exponents: identities that differ only in a γ power "
        "'hold'"),
    Mutant(
        "compare-never-records-mismatch", "engine-proofs", WEIGHTS,
        "if bad and mismatch is None:",
        "if bad and mismatch is not None:",
        (ENGINE,),
        "weights.compare never records a mismatch: every order-type proof 'holds'"),
    Mutant(
        "holds-strict-as-weak", "engine-proofs", WEIGHTS,
        'return c <= 0 if op == "<=" else (c < 0 if op == "<" else c == 0)',
        'return c <= 0 if op in ("<=", "<") else c == 0',
        (ENGINE,),
        "order-type proofs read a strict relation a < b as a <= b"),
    Mutant(
        "associativity-self-compare", "engine-proofs", ALGEBRA,
        "diff = sympy.expand(lhs - right.read(name, zs))",
        "diff = sympy.expand(lhs - left.read(name, zs))",
        (ENGINE,),
        "the associativity proof compares (A⊕B)⊕C with itself: any ⊕ is 'associative'"),
    Mutant(
        "joined-segment-rho", "engine-proofs", ALGEBRA,
        "return Segment(read, sympy.expand(left.rho * right.rho))",
        "return Segment(read, sympy.expand(right.rho))",
        (ENGINE,),
        "a joined segment's ρ forgets the left segment's length (ρ_AB = ρ_B): the "
        "associativity and exact checks evaluate ⊕ with the wrong decay"),
    # ------------------------------------------------------------------ codegen
    Mutant(
        "codegen-drops-coefficient", "codegen", CODEGEN,
        "            parts.append(_coef(c) + code)",
        "            parts.append(code)",
        (ENGINE,),
        "generated code drops the γ / ρ coefficient of every matrix term (plain products)"),
    Mutant(
        "codegen-spec-relations-reversed", "codegen", CODEGEN,
        "rels.append((END if a == END else order[a], op, END if b == END else order[b]))",
        "rels.append((END if b == END else order[b], op, END if a == END else order[a]))",
        (ENGINE,),
        "generated index-pattern specs (quadratic form, local chunk sums) hold every order "
        "relation reversed"),
    # ------------------------------------------------------------------ runtime (references)
    Mutant(
        "runtime-chunk-local-decay", "runtime", RUNTIME,
        "rho = np.array([g ** (j + 1) for j in range(n)]",
        "rho = np.array([g ** j for j in range(n)]",
        (REFS,), scope="def _chunked(",
        description="chunked reference: the carry reaches row j of a chunk decayed by γ^j instead of γ^(j+1)"),
    Mutant(
        "runtime-chunk-carry-decay", "runtime", RUNTIME,
        'new_carry.update(part["combine"](carry, total, g ** n))',
        'new_carry.update(part["combine"](carry, total, g ** (n - 1)))',
        (REFS,),
        "chunked reference: the carry crosses a chunk of n tokens decayed by γ^(n-1)"),
    Mutant(
        "runtime-causal-mask-strict", "runtime", RUNTIME,
        "mask &= np.broadcast_to(axis(j) <= tt, shape)",
        "mask &= np.broadcast_to(axis(j) < tt, shape)",
        (REFS,),
        "index-pattern sums (quadratic form, chunk-local summaries) exclude the current token"),
    Mutant(
        "runtime-decay-off-by-one", "runtime", RUNTIME,
        "expo = expo + be.scalar(c) * (tt - axis(j))",
        "expo = expo + be.scalar(c) * (tt - axis(j) + 1)",
        (REFS,),
        "index-pattern sums decay every term by one extra γ^c"),
    Mutant(
        "runtime-eps-dropped", "runtime", RUNTIME,
        "return o_num / (o_den + be.scalar(eps))",
        "return o_num / o_den",
        (ENGINE, REFS),
        "normalized references divide by the denominator without + eps"),
    Mutant(
        "runtime-eps-twice", "runtime", RUNTIME,
        "return o_num / (o_den + be.scalar(eps))",
        "return o_num / (o_den + 2 * be.scalar(eps))",
        (ENGINE, REFS),
        "normalized references add eps twice"),
    Mutant(
        "runtime-initial-state-ignored", "runtime", RUNTIME,
        "return {n: be.array(a) for n, a in st.items()}",
        "return {n: be.zeros(s) for n, s in shapes.items()}",
        (REFS, ENGINE),
        "references validate initial_state and then start from zero anyway"),
    # ------------------------------------------------------------------ validation
    Mutant(
        "reference-accepts-gamma-zero", "validation", "hla_core/validation.py",
        "if not math.isfinite(g) or not (0.0 < g <= 1.0):",
        "if not math.isfinite(g) or not (0.0 <= g <= 1.0):",
        (VALID,),
        "the reference API accepts gamma = 0"),
    Mutant(
        "kernel-accepts-gamma-zero", "kernel-validation", COMMON,
        "bool((g <= 0).any())",
        "bool((g < 0).any())",
        (K2,), k="bad_inputs",
        description="the kernels accept gamma = 0"),
    Mutant(
        "kernel-noncontiguous-inputs", "kernel-validation", COMMON,
        "q=q.contiguous(), k=k.contiguous(), v=v.contiguous()",
        "q=q, k=k, v=v",
        (K2, K3), k="contig or strided or bad_inputs",
        description="the kernels index q, k, v as if contiguous without making them so: "
                    "a transposed or sliced input gives wrong outputs"),
    Mutant(
        "kernel-eps-ignored", "kernel-normalization", GLA,
        "eps=torch.full((1,), float(eps), dtype=sdt, device=dev) if divide else dummy",
        "eps=torch.full((1,), 1e-6, dtype=sdt, device=dev) if divide else dummy",
        (K2,), k="eps or (float64 and chunk)",
        description="the normalized kernels ignore the eps argument (always 1e-6)"),
    # ------------------------------------------------------------------ error model
    Mutant(
        "error-model-m-halved", "error-model", ERRMODEL,
        "M_OPERAND = 6\nM_OPERAND_HLA3",
        "M_OPERAND = 3\nM_OPERAND_HLA3",
        (K2, "property_tests/test_error_model.py"), k="low_precision and bfloat16 and chunk or operand_roundings",
        description="the second-order operand rounding count m is halved (6 -> 3): the bound "
                    "no longer covers the counted roundings"),
    Mutant(
        "error-model-operand-roundoff-fp32", "error-model", ERRMODEL,
        "u_op = OPERAND_ROUNDOFF[name]",
        'u_op = OPERAND_ROUNDOFF["float32"]',
        (K2,), k="low_precision and bfloat16 and hla2 and chunk", scope="def beta(",
        description="the operand roundoff is fp32's for every dtype: the bf16 bound is far "
                    "too tight"),
    Mutant(
        "error-model-accumulator-bf16", "error-model", ERRMODEL,
        'u_acc = UNIT_ROUNDOFF["float64"] if name == "float64" else UNIT_ROUNDOFF["float32"]',
        'u_acc = UNIT_ROUNDOFF["float64"] if name == "float64" else UNIT_ROUNDOFF["bfloat16"]',
        (K2, K3), k="low_precision and float32 and chunk",
        scope="def beta(",
        description="beta counts the fp32 accumulator as bf16: the fp32 bound is ~65000x too "
                    "loose, so real fp32 kernel errors would pass"),
    # ------------------------------------------------------------------ kernels: masks, decays
    Mutant(
        "kernel-intra-chunk-mask-strict", "kernel-mask", GLA,
        "Dm = tl.where(c2 <= r2,",
        "Dm = tl.where(c2 < r2,",
        (K2, K3), k="float64 and chunk",
        description="chunk kernel: the intra-chunk causal mask j < r drops the diagonal j = r"),
    Mutant(
        "kernel-carry-readout-decay", "kernel-decay", GLA,
        "b = _decay(lg, pw, oc + 1, TABLE)",
        "b = _decay(lg, pw, oc, TABLE)",
        (K2, K3), k="float64 and chunk",
        description="chunk kernel: row r reads the chunk-start carry decayed by g^r instead "
                    "of g^(r+1)"),
    Mutant(
        "kernel-chunk-key-decay", "kernel-decay", GLA,
        "gk = tl.where(mr, _decay(lg, pw, tl.maximum(Lc - 1 - oc, 0), TABLE), 0)",
        "gk = tl.where(mr, _decay(lg, pw, tl.maximum(Lc - oc, 0), TABLE), 0)",
        (K2, K3), k="float64 and chunk", scope=CHUNK_KERNEL,
        description="chunk kernel: the carry update decays key j by g^(Lc-j) instead of "
                    "g^(Lc-1-j)"),
    Mutant(
        "kernel-recurrent-token-decayed", "kernel-decay", GLA,
        "X = gt * X + kt[:, None] * vt[None, :]",
        "X = gt * (X + kt[:, None] * vt[None, :])",
        (K2,), k="float64 and hla2 and recurrent",
        description="recurrent kernel: the new token's term is decayed along with the state"),
    Mutant(
        "kernel-recurrent-decay-power", "kernel-decay", GLA,
        "self._decays[power] = (g ** power).to(sdt)",
        "self._decays[power] = g.to(sdt)",
        (K2,), k="float64 and hla2 and recurrent",
        description="recurrent chains ignore the stage's decay power (HLA2's second stage "
                    "decays by g instead of g^2)"),
    Mutant(
        "kernel-table-ignores-power", "kernel-decay", GLA,
        "(g[:, None] ** (power * n)[None, :])",
        "(g[:, None] ** n[None, :])",
        (K2,), k="float64 and hla2 and chunk",
        description="float64 chunk kernels: the exact g^n table ignores the stage's power"),
    Mutant(
        "kernel-log2g-ignores-power", "kernel-decay", GLA,
        "log2g = (torch.log2(g) * power).to(sdt)",
        "log2g = torch.log2(g).to(sdt)",
        (K2,), k="low_precision and float32 and hla2 and chunk",
        description="fp32 chunk kernels: log2 g ignores the stage's power (HLA2's second "
                    "stage decays by g instead of g^2)"),
    Mutant(
        "host-cdiv-floors", "kernel-launch", "kernels/_common.py",
        "return -(-a // b)",
        "return a // b",
        (K2,), k="float64 and hla2 and chunk",
        description="host grid arithmetic: ceil division floors, so the last partial chunk / "
                    "value block / segment gets no program"),
    # ------------------------------------------------------------------ kernels: carry
    Mutant(
        "kernel-carry-not-decayed", "kernel-carry", GLA,
        "X = gX * X + tl.dot(tl.trans(kg), vd, input_precision=PREC, out_dtype=ACC)",
        "X = X + tl.dot(tl.trans(kg), vd, input_precision=PREC, out_dtype=ACC)",
        (K2, K3), k="float64 and chunk", scope=CHUNK_KERNEL,
        description="chunk kernel: the carry is not decayed across a chunk boundary"),
    Mutant(
        "hla3-bf16-drops-carry", "kernel-carry", GLA,
        "ob = bc[:, None] * tl.dot(qd, X.to(DOT), input_precision=PREC, out_dtype=ACC)",
        "ob = bc[:, None] * tl.dot(qd, (X * TABLE).to(DOT), input_precision=PREC, out_dtype=ACC)",
        (K3,), k="low_precision and bfloat16 and chunk",
        description="hla3 drops the carry at a chunk boundary: the fp32-accumulating chunk "
                    "kernel (bf16 inputs) leaves out q_rᵀ X0, asked of the hla3 bf16 tests "
                    "(issue 9: T=68, d=5, dv=7 passed 55% wrong)"),
    # ------------------------------------------------------------------ kernels: segments
    Mutant(
        "kernel-initial-state-segment-0-only", "kernel-initial-state", GLA,
        "    if HAS_INIT:\n",
        "    if HAS_INIT and s == 0:\n",
        (K2, K3), k="float64 and chunk", scope=CHUNK_KERNEL,
        description="the initial state is loaded only in segment 0: later segments fold "
                    "the earlier summaries onto a zero carry"),
    Mutant(
        "kernel-segment-fold-decay", "kernel-segments", GLA,
        "gS = tl.exp2(lg * SEG)",
        "gS = tl.exp2(lg * (SEG - 1))",
        (K2, K3), k="float64 and chunk",
        description="segment fold: the carry crosses a segment decayed by g^(SEG-1)"),
    Mutant(
        "kernel-segment-fold-drops-last", "kernel-segments", GLA,
        "for sp in range(0, tl.minimum(s, NSUM)):",
        "for sp in range(0, tl.minimum(s, NSUM) - 1):",
        (K2, K3), k="float64 and chunk",
        description="segment fold skips the summary of the segment just before"),
    Mutant(
        "kernel-summary-not-decayed", "kernel-segments", GLA,
        "X = gC * X + tl.dot(tl.trans(kg), vd, input_precision=PREC, out_dtype=ACC)",
        "X = X + tl.dot(tl.trans(kg), vd, input_precision=PREC, out_dtype=ACC)",
        (K2, K3), k="float64 and chunk", scope=SUMMARY_KERNEL,
        description="segment summary kernel: the summary is not decayed across its chunks"),
    # ------------------------------------------------------------------ kernels: varlen, state
    Mutant(
        "kernel-varlen-offset-ignored", "kernel-varlen", GLA,
        "bos = tl.load(cu + n).to(tl.int64)",
        "bos = (tl.load(cu + n) * 0).to(tl.int64)",
        (K2, K3), k="float64 and chunk",
        description="varlen: every packed sequence is read from row 0 (cu_seqlens offset lost)"),
    Mutant(
        "kernel-final-state-first-segment", "kernel-handoff", GLA,
        "if (start < L) & (stop == L):  # the sequence's last segment",
        "if start == 0:  # the sequence's last segment",
        (K2, K3), k="float64 and chunk",
        description="chunk kernel: the final state is stored by the first segment, not the last"),
    Mutant(
        "kernel-partial-chunk-decay", "kernel-handoff", GLA,
        "gC = _decay(lg, pw, Lc, TABLE)",
        "gC = _decay(lg, pw, C, TABLE)",
        (K2, K3), k="float64 and chunk", scope=CHUNK_KERNEL,
        description="chunk kernel: a partial last chunk decays the carry by g^C instead of "
                    "g^Lc (only the final state, i.e. the hand-off, is wrong)"),
    Mutant(
        "kernel-state-cast-fp32", "kernel-initial-state", COMMON,
        "out[name] = x.to(sdtype).contiguous()",
        "out[name] = x.to(torch.float32).contiguous()",
        (K2, K3), k="float64 and chunk",
        description="an initial state is cast to fp32 even for float64 kernels"),
    Mutant(
        "kernel-recurrent-side-init-ignored", "kernel-initial-state", GLA,
        "X1 = tl.load(x1_0 + sbase * D + ok, mask=mk, other=0).to(ACC)",
        "X1 = tl.zeros((BK,), dtype=ACC)",
        (K2,), k="float64 and recurrent", scope=RECURRENT_KERNEL,
        description="recurrent kernel: the normalized side carry of an initial state is "
                    "ignored"),
    Mutant(
        "kernel-value-block-offset", "kernel-blocks", GLA,
        "ov = iv * BV + tl.arange(0, BV)",
        "ov = tl.arange(0, BV)",
        (K2, K3), k="float64 and chunk", scope=CHUNK_KERNEL,
        description="chunk kernel: every value block reads and writes value columns 0..BV-1 "
                    "(wrong as soon as dv needs several blocks)"),
    # ------------------------------------------------------------------ kernels: normalization
    Mutant(
        "kernel-eps-dropped", "kernel-normalization", GLA,
        "ob = ob / (ob1 + tl.load(eps))[:, None]",
        "ob = ob / ob1[:, None]",
        (K2, K3), k="float64 and chunk",
        description="chunk kernel: the normalized output divides without + eps"),
    Mutant(
        "kernel-eps-twice-recurrent", "kernel-normalization", GLA,
        "ot = ot / (ot1 + tl.load(eps))",
        "ot = ot / (ot1 + 2 * tl.load(eps))",
        (K2,), k="float64 and recurrent",
        description="recurrent kernel: eps added twice to the denominator"),
    Mutant(
        "normalized-output-10pct-large", "kernel-normalization", GLA,
        "ob = ob / (ob1 + tl.load(eps))[:, None]",
        "ob = 1.1 * ob / (ob1 + tl.load(eps))[:, None]",
        (K2,), k="low_precision and bfloat16 and ahla and chunk",
        description="normalized output 10% too large, asked of the ahla bf16 tests (issue 9: "
                    "passed 15 of 23 examples)"),
    Mutant(
        "kernel-side-value-ignored", "kernel-normalization", GLA,
        "X1 = gX * X1 + tl.sum(kb.to(ACC) * (gk * w1)[:, None], 0)",
        "X1 = gX * X1 + tl.sum(kb.to(ACC) * gk[:, None], 0)",
        (K2, K3), k="float64 and chunk", scope=CHUNK_KERNEL,
        description="chunk kernel: the side carry ignores the side value (v1 = 1 assumed in "
                    "the carry of every stage, wrong for AHLA's and HLA3's last stage)"),
    # ------------------------------------------------------------------ kernels: chains
    Mutant(
        "chain-hla2-power", "kernel-chain", "kernels/hla2.py",
        'Stage("KK_QV", key="KK", value="v", power=2, side="KK_Q1")',
        'Stage("KK_QV", key="KK", value="v", power=1, side="KK_Q1")',
        (CHAINS,),
        "HLA2's chain decays its output carry by g instead of g^2"),
    Mutant(
        "chain-ahla-value", "kernel-chain", "kernels/ahla.py",
        'Stage("KQ_KV", key="k", value="KV", power=1, side="KQ_K1")',
        'Stage("KQ_KV", key="k", value="v", power=1, side="KQ_K1")',
        (CHAINS,),
        "AHLA's second stage reads the token's v instead of the first stage's output"),
    Mutant(
        "chain-hla3-power", "kernel-chain", "kernels/hla3.py",
        'Stage("KK_QQ_KV", key="KK", value="KV", power=3, side="KK_QQ_K1")',
        'Stage("KK_QQ_KV", key="KK", value="KV", power=2, side="KK_QQ_K1")',
        (CHAINS,),
        "HLA3's chain decays its output carry by g^2 instead of g^3"),
]

# --------------------------------------------------------------------------------------
# ENGINE DEFECTS OF ISSUE 9 (engine-translation and the other Pattern-front-end defects:
# the Pattern -> top-summary translation doubling a decay, index names colliding with
# internal names, fractional decays, decay strings evaluated as Python, the order of the
# dot factors). Maintained by the engine work (derivations/pattern.py,
# summaries.pattern_summary, proofs.py, codegen.py): add them here as Mutant(...) entries
# with area "engine-translation" (or the matching engine area).
ENGINE_DEFECTS: list[Mutant] = [
    # ------------------------------------------------------------------ engine: issue 9 defects
    # (each was a real escape before issue 9; the fix is the line these mutants undo)
    Mutant(
        "translation-doubles-decay", "engine-translation", SUMMARIES,
        's = make_summary(slots, pairs, {ren[x]: c for x, c in p.decay_coeffs})',
        's = make_summary(slots, pairs, {ren[x]: 2 * c for x, c in p.decay_coeffs})',
        (ENGINE,),
        "the Pattern -> top summary translation doubles every decay coefficient (invisible to "
        "the T <= 4 exact check for a pattern needing five positions; the translation "
        "certificate catches it)", k="translation or unseen"),
    Mutant(
        "index-name-collides-with-end", "engine-translation", SUMMARIES,
        'ren = {x: f"#{x}" for x in p.indices}',
        'ren = {x: x for x in p.indices}',
        (ENGINE,),
        "user index names reach the summaries unrenamed: an index called `end` is taken for "
        "the segment end", k="collide"),
    Mutant(
        "fractional-decay-as-sqrt", "codegen", CODEGEN,
        'return f"R.frac_pow({self._print(e.base)}, {exp.p}, {exp.q})"',
        'return f"sqrt({self._print(e.base)})" if exp.q == 2 else f"R.frac_pow({self._print(e.base)}, {exp.p}, {exp.q})"',
        (ENGINE,),
        "generated code prints γ^(1/2) as sqrt(g), undefined in the generated module",
        k="fractional"),
    Mutant(
        "decay-parser-evaluates-calls", "engine-translation", "derivations/pattern.py",
        'if isinstance(node, ast.Expression):',
        'if isinstance(node, ast.Call):\n        return _linear_form(ast.parse(str(eval(compile(ast.Expression(node), "", "eval"))), mode="eval"), names, decay)\n    if isinstance(node, ast.Expression):',
        (ENGINE,),
        "the decay parser evaluates function calls as Python (a decay string runs code)",
        k="parsed_never_run or malformed_decays"),
    Mutant(
        "chain-parser-no-backtracking", "engine-translation", "derivations/pattern.py",
        'rest = _walk(dots, value, m, 1 - s, used | {m})',
        'rest = _walk(dots, value, m, 1 - s, used | {m})\n            if rest is None:\n                return None',
        (ENGINE,),
        "the chain parser commits to the first dot at an index: the order of the factors "
        "decides whether a product parses", k="order_of_the_dot or self_dot"),
    # ------------------------------------------------------------------ gradients (issue 11)
    Mutant(
        "grad-out-side-read-forward", "engine-gradients", "derivations/gradients.py",
        'terms.append(GradTerm(wrt, f.var, f.in_vec, bwd, p.constraints, p.decay_coeffs,',
        'terms.append(GradTerm(wrt, f.var, f.in_vec, fwd, p.constraints, p.decay_coeffs,',
        (GRADS,),
        "a right-vector occurrence is cut open but its chain is read forward (wrong direction)"),
    Mutant(
        "grad-in-side-wrong-lead", "engine-gradients", "derivations/gradients.py",
        'terms.append(GradTerm(wrt, f.var, f.out_vec, fwd, p.constraints, p.decay_coeffs,',
        'terms.append(GradTerm(wrt, f.var, f.in_vec, fwd, p.constraints, p.decay_coeffs,',
        (GRADS,),
        "a left-vector occurrence leads with itself instead of its factor's other vector"),
    Mutant(
        "grad-drops-output-query", "engine-gradients", "derivations/gradients.py",
        "        if f.out_vec == wrt:\n            terms.append(",
        "        if f.out_vec == wrt and i > 0:\n            terms.append(",
        (GRADS,),
        "the gradient through the output token's own query (dq_t of q_tᵀ X_t) is dropped"),
    Mutant(
        "grad-prefix-decay-double-counted", "engine-gradients", "derivations/gradients.py",
        'for v in P if v != "#@"), Fraction(0))',
        'for v in P), Fraction(0))',
        (GRADS,),
        "the two-sided split counts the decay of the output index twice when a factor sits at "
        "s (the bug the streaming certificate caught while it was written)",
        k="unseen_patterns_gradient_proofs or unseen_patterns_get"),
    Mutant(
        "grad-suffix-decay-sign", "engine-gradients", "derivations/gradients.py",
        'dec = {v: -coeff.get(v, Fraction(0)) for v in comp_vars}',
        'dec = {v: coeff.get(v, Fraction(0)) for v in comp_vars}',
        (GRADS,),
        "the suffix side measures its decay from the wrong end"),
    Mutant(
        "grad-readout-no-shift", "engine-gradients", "derivations/gradients.py",
        'coef = GAMMA ** sympy.Rational(c_p.numerator, c_p.denominator) if F else sympy.Integer(1)',
        'coef = sympy.Integer(1)',
        (GRADS,),
        "the readout at s forgets γ^{C_P}: the suffix state's end is s+1, not s"),
    Mutant(
        "grad-suffix-state-off-by-one", "runtime", RUNTIME,
        'gs.readout(pre[s], suf.get(s + 1, empty), g)',
        'gs.readout(pre[s], suf.get(s, empty), g)',
        (GRADS,),
        "the streaming VJP reads the suffix state that already holds token s"),
    Mutant(
        "grad-denominator-cotangent-sign", "runtime", RUNTIME,
        '"den": -np.sum(do * (o_num / den), axis=1, keepdims=True) / den}',
        '"den": np.sum(do * (o_num / den), axis=1, keepdims=True) / den}',
        (GRADS,),
        "quotient rule with the wrong sign on the denominator's cotangent"),
    Mutant(
        "grad-numerator-cotangent-undivided", "runtime", RUNTIME,
        'return {"num": do / den,',
        'return {"num": do,',
        (GRADS,),
        "normalized VJP forgets to divide the numerator's cotangent by D + eps"),
    Mutant(
        "grad-chunked-reverse-index", "runtime", RUNTIME,
        'out[(T - 1 - (lo + j)) if reverse else lo + j]',
        'out[(T - (lo + j)) % T if reverse else lo + j]',
        (GRADS,),
        "the chunked suffix scan maps reversed positions back one token off"),
    Mutant(
        "grad-spec-decay-sign", "codegen", CODEGEN,
        'expo[order["t"]] = expo.get(order["t"], 0) + co',
        'expo[order["t"]] = expo.get(order["t"], 0) - co',
        (GRADS,),
        "the quadratic VJP's γ exponent takes the old output's position with the wrong sign",
        k="unseen_patterns_get or exact_vjp"),
    Mutant(
        "grad-proof-uses-pattern-decay", "engine-proofs", "derivations/gradients.py",
        'lhs = _cycle_psums([(closed_cycle(t), t.constraints, t.decay) for t in terms], Fresh("a"))',
        'lhs = _cycle_psums([(closed_cycle(t), p.constraints, p.decay_coeffs) for t in terms], Fresh("a"))',
        (GRADS,),
        "the derivative certificate reads the pattern's decay instead of each term's own: a "
        "wrong decay in a term would go unproved", k="rejects"),
    # state hand-off (initial_state / dstate) of the reference VJPs
    Mutant(
        "handoff-pullback-drops-decay", "runtime", RUNTIME,
        "return None if a is None else _Node(tape, s * a.val, ((a, lambda c: s * c),))",
        "return None if a is None else _Node(tape, s * a.val, ((a, lambda c: c),))",
        (GRADS,),
        "the hand-off reverse pass forgets the decay factor γ^c of a scaled term: the initial "
        "state's gradient (and the tokens' through it) misses its decay", k="handoff"),
    Mutant(
        "handoff-dstate-empty-prefix-part-ignored", "runtime", RUNTIME,
        "end_cot = {} if dS is None else {n: (dS[n], dS[n]) for n in shapes}",
        "end_cot = {} if dS is None else {n: (dS[n], None) for n in shapes}",
        (GRADS,),
        "dstate reaches only the part of the final state that depends on initial_state, not "
        "the tokens' own contribution", k="handoff"),
    Mutant(
        "handoff-checkpoint-decay", "runtime", RUNTIME,
        "nxt.update(part[\"combine\"](A, B, g ** (hi - lo)))",
        "nxt.update(part[\"combine\"](A, B, g ** (hi - lo - 1)))",
        (GRADS,),
        "the chunked hand-off's checkpoints cross a chunk of n tokens decayed by γ^(n-1)",
        k="handoff"),
]
# --------------------------------------------------------------------------------------

CATALOGUE += ENGINE_DEFECTS

# --------------------------------------------------------------------------------------
# The conformance harness (hla_core/conformance.py): a harness that passes a wrong
# implementation, or calls a property passed that it never ran, is worse than none.
CONFORM = "hla_core/conformance.py"
CONFORM_TESTS = "property_tests/test_conformance.py"
CONFORMANCE_DEFECTS: list[Mutant] = [
    Mutant(
        "conformance-reference-ignores-gamma", "conformance", CONFORM,
        "                                             gamma, normalize, eps)",
        "                                             1.0, normalize, eps)",
        (CONFORM_TESTS,),
        "the reference is evaluated without decay: every correct decayed implementation fails and "
        "the paper's decayed recurrences are judged against the wrong operator",
        k="correct_loop or paper_decayed", scope="def reference("),
    Mutant(
        "conformance-handoff-never-splits", "conformance", CONFORM,
        'o = self.torch.cat([o1, o2], dim=2 if self.cfg.layout == "bhtd" else 1)',
        "o = self.call(q, k, v, case=case)[0]",
        (CONFORM_TESTS,),
        "the hand-off property judges the whole-sequence run instead of the split one: a state "
        "hand-off that drops a summary passes", k="dropped_summary"),
    Mutant(
        "conformance-not-applicable-reported-passed", "conformance", CONFORM,
        "            row.reason = plan\n",
        "            row.reason, row.status = plan, PASSED\n",
        (CONFORM_TESTS,),
        "a property the function cannot express (no gamma, no initial_state, ...) is reported "
        "passed instead of not applicable", k="not_applicable"),
    Mutant(
        "conformance-ok-if-any-passed", "conformance", CONFORM,
        "return all(r.status != FAILED for r in self.rows)",
        "return any(r.status == PASSED for r in self.rows)",
        (CONFORM_TESTS,),
        "the report (and the exit status) counts as a pass when any property passed",
        k="cli_exit_status or shrink"),
    Mutant(
        "conformance-varlen-reference-unsegmented", "conformance", CONFORM,
        "return self.judge(o, self.ref(q, k, v, case, cu=cu.cpu()), case,",
        "return self.judge(o, self.ref(q, k, v, case), case,",
        (CONFORM_TESTS,),
        "the varlen property's reference runs the packed sequences as one: a correct varlen "
        "kernel fails (and one that leaks state across sequences would pass)", k="chunk_hla2"),
]
CATALOGUE += CONFORMANCE_DEFECTS

# ------------------------------------------------------------------ backward: fused key/value launch
KB = "property_tests/test_kernels_backward.py"
PAIR = "kernels/backward_pair.py"
BACKWARD_PAIR_DEFECTS = [
    Mutant(
        "pair-diagonal-dropped", "kernel-backward", PAIR,
        "Dm = tl.where(c2 <= r2, _decay",
        "Dm = tl.where(c2 < r2, _decay",
        (KB,), k="float64_grads_equal and chunk",
        description="fused reversed key/value launch: the intra-chunk mask j < r drops the "
                    "diagonal t = j of both rules"),
    Mutant(
        "pair-segment-fold-undecayed", "kernel-backward", PAIR,
        "Y = fS * Y + tl.load(dx",
        "Y = Y + tl.load(dx",
        (KB,), k="segments or fused_key_value",
        description="fused reversed key/value launch: the earlier segments' carries are folded "
                    "in without the decay g^SEG"),
    Mutant(
        "pair-key-stage-drops-value-rule", "kernel-backward", PAIR,
        "outa += outb",
        "outa = outb",
        (KB,), k="float64_grads_equal and chunk",
        description="fused reversed key/value launch of a key stage (a = b = k): dk gets only "
                    "the value rule's part (da is overwritten, not added)"),
    Mutant(
        "error-model-backward-writers-uncounted", "error-model", ERRMODEL,
        "return accumulation_depth(T, w, chunk_size, gamma, op=op) + CHAIN_STAGES[op] - 1",
        "return accumulation_depth(T, w, chunk_size, gamma, op=op)",
        ("property_tests/test_error_model.py",), k="backward",
        description="the backward model's depth leaves out the fp32 sums of a gradient's several "
                    "writers (dq: one per stage)"),
]
CATALOGUE += BACKWARD_PAIR_DEFECTS

QP = "kernels/backward_query.py"
QUERY_PAIR_DEFECTS = [
    Mutant(
        "query-pair-second-term-decay", "kernel-backward", QP,
        "la2, p2, b2, Dm2 = _term_decays(lg2, pw2, h, oc, C, ACC, TABLE)",
        "la2, p2, b2, Dm2 = _term_decays(lg1, pw1, h, oc, C, ACC, TABLE)",
        (KB,), k="float64_grads_equal and chunk",
        description="query pair (two stages' dq rules in one launch): the second term runs with the "
                    "first term's decay (HLA2: g instead of g^2 for one of them)"),
    Mutant(
        "query-pair-first-term-dropped", "kernel-backward", QP,
        "ob += ob2",
        "ob = ob2",
        (KB,), k="float64_grads_equal and chunk",
        description="query pair: dq gets only the second stage's query rule"),
    Mutant(
        "query-pair-fold-undecayed", "kernel-backward", QP,
        "X = gS * X + tl.load(dx",
        "X = X + tl.load(dx",
        (KB,), k="segments or query_pair",
        description="query pair: the earlier segments' carries are folded in without the decay g^SEG"),
    Mutant(
        "query-pair-drops-initial-carry", "kernel-backward", QP,
        "X1 = tl.load(x01 + sbase",
        "X1 = 0 * tl.load(x01 + sbase",
        (KB,), k="state_gradients or query_pair",
        description="query pair: the first term's initial carry (an initial state's part of dq, "
                    "g^(t+1) dN_t X0) is dropped"),
    Mutant(
        "query-pair-cp-second-carry-wrong-decay", "context-parallel", QP,
        "inits = la.cp.carry_in((p1, p2), SEG",
        "inits = la.cp.carry_in((p1, p1), SEG",
        ("property_tests/test_cp.py",), k="ranks_equal_one_process and not gpu",
        description="query pair across ranks: the second term's carry from the earlier ranks is "
                    "folded with the first term's decay"),
]
CATALOGUE += QUERY_PAIR_DEFECTS

CP = "kernels/cp.py"
CPT = "property_tests/test_cp.py"
CP_DEFECTS = [
    Mutant(
        "cp-fold-undecayed", "context-parallel", CP,
        "acc = piece if acc is None else combine(acc, piece, per_head(rho[s], x))",
        "acc = piece if acc is None else combine(acc, piece, 1.0)",
        (CPT,), k="ranks_equal_one_process and not gpu",
        description="context parallel: the earlier ranks' carries are folded without the decay "
                    "over the ranks in between (rho = 1)"),
    Mutant(
        "cp-reverse-not-shifted", "context-parallel", CP,
        "lead=g.to(dtype) if shift else None,",
        "lead=None,",
        (CPT,), k="ranks_equal_one_process and not gpu",
        description="context parallel backward: a slice read backward in time hands on Z, not g Z "
                    "(the shifted carry of a final-state cotangent)"),
    Mutant(
        "cp-last-segment-unsummarized", "context-parallel", GLA,
        "return SEG, nseg, nseg if self.cp is not None else nseg - 1",
        "return SEG, nseg, nseg - 1",
        (CPT,), k="ranks_equal_one_process and not gpu",
        description="context parallel: the slice's summary leaves out its last segment"),
    Mutant(
        "cp-own-carry-dropped", "context-parallel", CP,
        "acc = b if acc is None else acc + b",
        "acc = acc",
        (CPT,), k="ranks_equal_one_process and not gpu",
        description="context parallel: a rank's own carry (rank 0's initial state, a final-state "
                    "cotangent) is left out of the carry it starts from"),
    Mutant(
        "cp-initial-state-anywhere", "context-parallel", CP,
        "    if any(has[1:]):",
        "    if False:",
        (CPT,), k="bad_use",
        description="context parallel: an initial state given on a rank other than 0 is silently used"),
    Mutant(
        "cp-local-failure-silent", "context-parallel", CP,
        "        if group is not None and _usable(group):",
        "        if False:",
        (CPT,), k="bad_use",
        description="context parallel: a rank whose own argument checks fail raises without joining the "
                    "header exchange, so the other ranks wait for it forever"),
    Mutant(
        "cp-fusions-unchecked", "context-parallel", CP,
        "float(fusions)] + extra)",
        "0.0] + extra)",
        (CPT,), k="bad_use",
        description="context parallel: ranks whose backward launch switches differ (HLA_BWD_PAIR, "
                    "HLA_BWD_QUERY_PAIR) run different exchanges without an error"),
    Mutant(
        "cp-gamma-unchecked", "context-parallel", CP,
        "gsum = float(zlib.crc32(g64.numpy().tobytes()))",
        "gsum = 0.0",
        (CPT,), k="bad_use",
        description="context parallel: ranks with different decays run without an error (gamma's "
                    "digest left out of the agreement check)"),
    Mutant(
        "pair-carry-in-unshifted", "kernel-backward", "kernels/backward_pair.py",
        "bc_ = _decay(lg, pw, oc + 1 - f0, TABLE)",
        "bc_ = _decay(lg, pw, oc + 1, TABLE)",
        ("property_tests/test_kernels_backward.py",), k="fused_key_value",
        description="fused reversed key/value launch: a final-state cotangent (or the later ranks' "
                    "carry) enters the first token one decay too late"),
    Mutant(
        "bwd-inputs-held-on-ctx", "kernel-backward", "kernels/backward.py",
        'ctx.held = _pack(dict(p=dict(p), st=st, out=out), tensors, {})',
        'ctx.held = dict(p=dict(p), st=st, out=out)',
        ("property_tests/test_kernels_backward.py",), k="in_place or autograd_saved",
        description="autograd op: q, k, v kept as ctx attributes instead of saved tensors, so an "
                    "in-place change after the forward silently changes the gradients"),
    Mutant(
        "bwd-second-order-unmarked", "kernel-backward", "kernels/backward.py",
        "        if torch.is_grad_enabled():  # create_graph=True",
        "        if False:  # create_graph=True",
        ("property_tests/test_kernels_backward.py",), k="double_backward",
        description="autograd op: gradients under create_graph=True carry no graph, so a loss built "
                    "on them (gradient penalty) silently loses that term"),
    Mutant(
        "key-stage-carry-untransposed", "kernel-backward", GLA,
        "    return frozenset(s.state for s in chain if s.key == s.value)",
        "    return frozenset()",
        ("property_tests/test_kernels_backward.py",), k="state_gradients",
        description="a learned non-symmetric initial KK read as the LA carry (S^T q) where the "
                    "reference reads S q"),
]
CATALOGUE += CP_DEFECTS


def _check_ids():
    seen = set()
    for m in CATALOGUE:
        if m.id in seen:
            raise ValueError(f"duplicate mutant id {m.id!r}")
        seen.add(m.id)


_check_ids()
