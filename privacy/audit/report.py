"""The audit's human-readable outputs: a text table and a plot of audited vs claimed epsilon."""

from pathlib import Path

LABELS = {"one_run": "one run", "one_run_fdp": "one run, f-DP", "tight_family": "one run, claimed family",
          "many_runs_cp": "many runs, Clopper-Pearson", "many_runs_gdp": "many runs, GDP estimate"}


def _verdict(entry: dict) -> str:
    if entry["violation"]:
        return "VIOLATION" if entry["rigorous"] else "above (estimate)"
    if entry["epsilon_ceiling"] <= entry["epsilon_claimed"]:
        return "blind here"  # even a perfect attack could not certify the claimed epsilon
    return "ok"


def table(entries: list[dict]) -> str:
    """One line per (canary, estimator) of one audit point."""
    header = (f"{'canary':<7} {'estimator':<27} {'claimed':>8} {'audited >=':>10} {'ratio':>6} "
              f"{'confidence':>10} {'ceiling':>8}  {'runs x canaries':>15} {'seconds':>7} {'assumes':>7}  verdict")
    lines = [header, "-" * len(header)]
    for e in entries:
        ratio = e["epsilon_lower"] / e["epsilon_claimed"] if e["epsilon_claimed"] > 0 else float("nan")
        size = f"{e['runs']} x {e['canaries']}"
        lines.append(f"{e['canary']:<7} {LABELS[e['estimator']]:<27} {e['epsilon_claimed']:>8.3f} "
                     f"{e['epsilon_lower']:>10.3f} {ratio:>6.2f} {e['confidence']:>10.4f} "
                     f"{e['epsilon_ceiling']:>8.2f}  {size:>15} {e['seconds']:>7.1f} "
                     f"{'nothing' if e['assumption_free'] else 'see *':>7}  {_verdict(e)}")
    for assumption in dict.fromkeys(e["assumption"] for e in entries if e["assumption"]):
        users = ", ".join(f"{e['canary']} {LABELS[e['estimator']]}" for e in entries if e["assumption"] == assumption)
        lines.append(f"* {users} assume(s): {assumption}")
    return "\n".join(lines)


def sweep_table(points: list[dict]) -> str:
    """One line per sigma: the claimed epsilon and every entry's audited bound."""
    columns = [(e["canary"], e["estimator"]) for e in points[0]["audits"]]
    names = [f"{c} {LABELS[s].replace('many runs, ', '')}" for c, s in columns]
    header = f"{'sigma':>7} {'claimed':>8} " + " ".join(f"{n:>24}" for n in names)
    lines = [header, "-" * len(header)]
    for point in points:
        values = {(e["canary"], e["estimator"]): e["epsilon_lower"] for e in point["audits"]}
        lines.append(f"{point['sigma']:>7.3f} {point['epsilon_claimed']:>8.3f} "
                     + " ".join(f"{values[c]:>24.3f}" for c in columns))
    return "\n".join(lines)


def plot(points: list[dict], path: Path, title: str) -> None:
    """Audited lower bound against the accountant's epsilon, one line per (canary, estimator)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    points = sorted(points, key=lambda p: p["epsilon_claimed"])
    claimed = [p["epsilon_claimed"] for p in points]
    figure, axes = plt.subplots(figsize=(7, 5))
    top = max(claimed)
    for key in [(e["canary"], e["estimator"]) for e in points[0]["audits"]]:
        audited = [next(e["epsilon_lower"] for e in p["audits"] if (e["canary"], e["estimator"]) == key)
                   for p in points]
        top = max(top, *audited)
        axes.plot(claimed, audited, marker="o", linestyle="--" if key[1] == "many_runs_gdp" else "-",
                  label=f"{key[0]}, {LABELS[key[1]]}")
    axes.plot([0, top], [0, top], color="black", linewidth=0.8, label="audited = claimed")
    # the tight line's ceiling depends on sigma: none drawn
    for estimator, style in (("one_run", ":"), ("one_run_fdp", (0, (1, 3))), ("many_runs_cp", "-.")):
        ceilings = [e["epsilon_ceiling"] for e in points[0]["audits"] if e["estimator"] == estimator]
        if ceilings:  # what a perfect attack would certify: the audit is blind to claims above it
            axes.axhline(max(ceilings), color="grey", linestyle=style, linewidth=0.8,
                         label=f"ceiling, {LABELS[estimator]}")
    for point in points:
        axes.annotate(f"sigma {point['sigma']:.2f}", (point["epsilon_claimed"], point["epsilon_claimed"]),
                      textcoords="offset points", xytext=(-4, 6), ha="right", fontsize=7)
    axes.set_xlabel("claimed epsilon (accountant)")
    axes.set_ylabel("audited lower bound on epsilon")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
