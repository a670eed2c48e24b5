"""SAE benchmarks: MP-SAE speed against the naive unrolled loop (and overcomplete's MpSAE when
it imports), and EV-vs-L0 Pareto curves of every SAE type on sklearn's digits. Writes JSON +
markdown tables (+ a PNG) to --out; the MP table also as sae_mp-threads<n>.{json,md}.

    python benchmarks/sae.py [--quick] [--threads 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path

import torch
from _lgm import cpu_model

from probunroll import sae
from probunroll.data import load_digits
from probunroll.linalg import matching_pursuit


def naive_mp(x: torch.Tensor, D: torch.Tensor, k: int) -> torch.Tensor:
    """The faithful baseline, overcomplete's ``MpSAE.encode`` loop with signed selection
    (argmax |α|, where overcomplete takes the signed max): each step a dense r Dᵀ, argmax,
    and a dense one-hot (B × c) @ D residual update; autograd keeps every one-hot."""
    r, codes = x, torch.zeros(x.shape[0], D.shape[0], dtype=x.dtype)
    for _ in range(k):
        alpha = r @ D.T
        j = alpha.abs().argmax(-1)
        onehot = torch.nn.functional.one_hot(j, D.shape[0]).to(x.dtype)
        z = alpha * onehot
        codes = codes + z
        r = r - z @ D
    return codes


def timed(fn, repeats=1):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def import_overcomplete_mpsae():
    """overcomplete's ``MpSAE`` class (or None) and a note on how it was imported.

    ``overcomplete/__init__.py`` imports its whole vision stack (torchvision, timm, OpenCV),
    which MpSAE never touches. When that import fails, the ``overcomplete.sae`` subpackage is
    imported on its own, under a bare package module that skips the top-level ``__init__``;
    its code is unchanged. Any failure is caught (not only ImportError) and reported.
    """
    try:
        from overcomplete.sae.mp_sae import MpSAE

        return MpSAE, "imported normally"
    except Exception as e:  # an optional baseline, never a dependency
        reason = f"{type(e).__name__}: {e}"
    try:
        spec = importlib.util.find_spec("overcomplete")
        if spec is None or spec.submodule_search_locations is None:
            return None, f"not installed ({reason})"
        for name in [m for m in sys.modules if m.split(".")[0] == "overcomplete"]:
            del sys.modules[name]  # half-imported leftovers of the failed attempt
        package = types.ModuleType("overcomplete")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["overcomplete"] = package
        from overcomplete.sae.mp_sae import MpSAE

        return MpSAE, f"overcomplete.sae imported without overcomplete/__init__.py ({reason})"
    except Exception as e:
        return None, f"{reason}; overcomplete.sae alone: {type(e).__name__}: {e}"


def bench_mp(B, d, c, k, repeats=3):
    """Forward + backward of ‖x − x̂‖² in D, each method decoding the way its SAE does:
    the naive loop with x̂ = codes @ D, probunroll's MP-SAE with x̂ = x − r
    (Σ_t a_t D_{j_t}, no dense product); probunroll with the dense decode is listed too.
    Every run starts from a fresh copy of D, so the Gram matrix is built in every run, as in
    a training step. Runs are interleaved and the best of ``repeats`` is kept, which evens
    out load from other processes.

    overcomplete's ``MpSAE`` (when it imports) gets the same D (copied into its
    ``dictionary._weights``) and x, and is timed the same way. It selects the signed maximum
    correlation (``torch.max``, no absolute value), so it is checked against and compared
    with probunroll's ``nonnegative=True`` MP, which selects the same atom; the two differ
    only once no correlation is positive (probunroll stops, overcomplete adds the negative
    one), which ``ours_stopped_early`` counts."""
    g = torch.Generator().manual_seed(0)
    D0 = torch.randn(c, d, generator=g)
    D0 = D0 / D0.norm(dim=-1, keepdim=True)
    x = torch.randn(B, d, generator=g)

    def naive():
        D = D0.clone().requires_grad_()
        codes = naive_mp(x, D, k)
        ((codes @ D - x) ** 2).sum().backward()
        return codes.detach(), D.grad

    def ours_dense():
        D = D0.clone().requires_grad_()
        codes = matching_pursuit(x, D, k).codes
        ((codes @ D - x) ** 2).sum().backward()
        return codes.detach(), D.grad

    def ours(nonnegative=False):
        D = D0.clone().requires_grad_()
        res = matching_pursuit(x, D, k, nonnegative=nonnegative)
        x_hat = x - res.residual
        ((x_hat - x) ** 2).sum().backward()
        return res.codes.detach(), D.grad

    OURS = "probunroll MP-SAE (Gram + triangular, decode x − r), fwd+bwd"
    OURS_NN = "probunroll MP-SAE, nonnegative (overcomplete's selection), fwd+bwd"
    OC = "overcomplete MpSAE (one-hot loop, decode codes @ D), fwd+bwd"
    methods = {
        "naive unrolled loop (one-hot), fwd+bwd": naive,
        "probunroll Gram + triangular, dense decode codes @ D, fwd+bwd": ours_dense,
        OURS: ours,
        OURS_NN: lambda: ours(nonnegative=True),
    }
    MpSAE, oc_note = import_overcomplete_mpsae()
    print(f"overcomplete MpSAE: {oc_note}")
    if MpSAE is not None:
        oc_model = MpSAE(d, c, k=k)  # dropout None, train mode: the dictionary is D itself

        def overcomplete():
            with torch.no_grad():
                oc_model.dictionary._weights.copy_(D0)
            oc_model.zero_grad(set_to_none=True)
            _, codes, x_hat = oc_model(x)
            ((x_hat - x) ** 2).sum().backward()
            return codes.detach(), oc_model.dictionary._weights.grad

        methods[OC] = overcomplete
    best = dict.fromkeys(methods, float("inf"))
    outs = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            t, outs[name] = timed(fn)
            best[name] = min(best[name], t)
    names = list(methods)

    def agreement(name, ref):
        (c_ours, g_ours), (c_ref, g_ref) = outs[name], outs[ref]
        return {"same_support": bool(torch.equal(c_ours != 0, c_ref != 0)),
                "max_code_diff": float((c_ours - c_ref).abs().max()),
                "grad_rel_diff": float((g_ours - g_ref).norm() / g_ref.norm())}  # fmt: skip

    rows = [{"method": names[0], "seconds": best[names[0]], "speedup": 1.0}]
    for name in names[1:4]:  # probunroll against the naive loop (signed), or the nonneg one
        row = {"method": name, "seconds": best[name], "speedup": best[names[0]] / best[name]}
        if name != OURS_NN:
            row.update(agreement(name, names[0]))
        rows.append(row)
    if MpSAE is None:
        rows.append({"method": "overcomplete MpSAE", "seconds": None, "note": oc_note})
        return rows
    with torch.no_grad():
        stopped = matching_pursuit(x, D0, k, nonnegative=True).indices.lt(0).any(-1)
    row = {"method": OC, "seconds": best[OC], "speedup": best[names[0]] / best[OC],
           "overcomplete_over_ours": best[OC] / best[OURS_NN],
           "overcomplete_over_ours_signed": best[OC] / best[OURS],
           "checked_against": OURS_NN, "ours_stopped_early": int(stopped.sum()),
           "note": oc_note}  # fmt: skip
    row.update(agreement(OC, OURS_NN))
    rows.append(row)
    return rows


def mp_markdown(title, rows):
    """The MP speed table, and overcomplete's time over ours when it ran."""
    lines = [title, "", "| method | seconds | speed-up over the naive loop |", "|---|---|---|"]
    for r in rows:
        if r["seconds"] is None:
            lines.append(f"| {r['method']} | — | — ({r['note']}) |")
        else:
            lines.append(f"| {r['method']} | {r['seconds']:.3f} | {r['speedup']:.1f}× |")
    for r in rows:
        if "overcomplete_over_ours" in r:
            lines += ["", f"overcomplete MpSAE takes {r['overcomplete_over_ours']:.1f}× as long "
                      f"as probunroll's MP-SAE with the same selection "
                      f"({r['overcomplete_over_ours_signed']:.1f}× the signed one); codes: same "
                      f"support {r['same_support']}, max difference {r['max_code_diff']:.1e}, "
                      f"gradient relative difference {r['grad_rel_diff']:.1e}."]  # fmt: skip
    return lines


def pareto(steps):
    x_train, x_test = load_digits()
    d, c = 64, 256
    configs = []
    for k in (2, 5, 10):
        configs += [
            ("MP-SAE", k, lambda k=k: sae.MatchingPursuitSAE(d, c, k, random_state=0)),
            ("TopK", k, lambda k=k: sae.TopKSAE(d, c, k, random_state=0)),
            ("BatchTopK", k, lambda k=k: sae.BatchTopKSAE(d, c, k, random_state=0)),
            ("RA-TopK", k, lambda k=k: sae.ArchetypalSAE(
                sae.kmeans(x_train, 512, random_state=0) - x_train.mean(0), c, k, delta=0.5,
                use_multiplier=True, random_state=0)),
            ("JumpReLU", k, lambda k=k: sae.JumpReLUSAE(d, c, sparsity_coef=1.0, target_l0=k,
                                                       threshold_init=0.1, random_state=0)),
        ]  # fmt: skip
    for coef in (0.3, 0.1, 0.03):
        configs.append(
            ("ReLU-L1", coef, lambda coef=coef: sae.ReLUSAE(d, c, l1_coef=coef, random_state=0))
        )
    for scale in (0.5, 0.1, 0.02):
        configs.append(
            ("SpaDE", scale, lambda s=scale: sae.SpaDE(d, c, scale_init=s, random_state=0))
        )
    rows = []
    for name, setting, make in configs:
        model = make()
        t0 = time.perf_counter()
        sae.train(
            model, x_train, steps=steps, batch_size=128, lr=5e-3, log_every=steps, progress=False
        )
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            z = model.encode(x_test)
            ev = float(sae.metrics.explained_variance(x_test, model.decode(z)))
            dead = float(sae.metrics.dead_fraction(model.encode(x_train)))
        row = {"model": name, "setting": setting, "l0": float(sae.metrics.l0(z))}
        row.update(explained_variance=ev, dead_fraction=dead, train_seconds=seconds)
        row["coherence_mean"] = sae.metrics.coherence(model.dictionary, "mean")
        rows.append(row)
        print(f"  {name:<10} {setting!s:<6} L0={row['l0']:6.2f} EV={ev:.3f}")
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((r["l0"], r["explained_variance"]) for r in rows if r["model"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xticks([1, 2, 5, 10, 20, 50, 100])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("L0 (test)")
    ax.set_ylabel("explained variance (test)")
    ax.set_title("digits 8×8, c = 256")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller MP problem, fewer steps")
    ap.add_argument("--mp-only", action="store_true", help="only the MP speed table")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs per MP method")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    size = (256, 384, 4096, 32) if args.quick else (1024, 384, 4096, 32)
    B, d, c, k = size
    title = f"MP forward+backward, float32, B={B} d={d} c={c} k={k}, {args.threads} threads"
    print(title)
    load_before = os.getloadavg()  # the timings are only as quiet as the machine
    mp_rows = bench_mp(*size, repeats=args.repeats)
    load = {"before": load_before, "after": os.getloadavg(), "cpus": os.cpu_count()}
    print(f"load average (1, 5, 15 min) before {load['before']}, after {load['after']}")
    lines = mp_markdown(title, mp_rows)
    result = {"torch": torch.__version__, "threads": args.threads, "size": size, "load": load}
    result["cpu"] = cpu_model()
    result["mp"] = mp_rows
    print("\n".join(lines))
    stem = f"sae_mp-threads{args.threads}" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    if args.mp_only:
        return
    print("Pareto on digits")
    p_rows = pareto(100 if args.quick else args.steps)
    result["pareto"] = p_rows
    (args.out / "sae.json").write_text(json.dumps(result, indent=2))
    lines += [
        "",
        "| model | setting | L0 | EV | dead | mean max cos |",
        "|---|---|---|---|---|---|",
    ]
    for r in p_rows:
        ev, dead, coh = r["explained_variance"], r["dead_fraction"], r["coherence_mean"]
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['l0']:.2f} | {ev:.3f} | {dead:.2f} | {coh:.2f} |"
        )
    (args.out / "sae.md").write_text("\n".join(lines) + "\n")
    plot(p_rows, args.out / "sae_pareto.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
