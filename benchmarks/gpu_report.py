"""gpu_check.json -> the markdown summary ``gpu_check.md`` (tables a reader can paste into docs/performance.md)."""


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def _skipped_and_errors(section: dict) -> list:
    lines = [f"- skipped `{what}`: {why}" for what, why in section.get("skipped", {}).items()]
    if section.get("error"):
        lines.append(f"- **error**: {section['error']}")
    for key in ("checks", "results"):
        for name, entry in section.get(key, {}).items():
            if entry.get("error"):
                lines.append(f"- **error in `{name}`**: {entry['error']}")
    return lines


def _check_figures(name: str, check: dict) -> str:
    if check.get("error"):
        return "error (below)"
    if name in ("eval_detections",):
        return (f"counts {check['counts']}, max score diff {_fmt(check['max_score_diff'], 3)}, max box diff "
                f"{_fmt(check['max_box_diff_px'], 3)} px, unmatched {check['unmatched']}")
    if name == "train_losses_fp32":
        worst = max(check["relative_difference"].values())
        return f"max relative loss diff {_fmt(worst, 3)}, gradient cosine {check['gradient_cosine']:.6f}"
    if name == "focal_loss":
        return "; ".join(f"{dtype}: loss {_fmt(r['relative_loss_difference'], 3)}, grad "
                         f"{_fmt(r['relative_max_gradient_difference'], 3)}" for dtype, r in check.items()
                         if isinstance(r, dict)) + f" (shape {check['shape']})"
    if name == "channels_last":
        return (f"detections {_fmt(check['eval_detections']['passed'])}, training "
                f"{_fmt(check['training']['passed'])}")
    if name == "amp_training":
        return "; ".join(f"{dtype}: final {_fmt(r['final_relative_difference'], 3)}, max dev "
                         f"{_fmt(r['max_relative_deviation'], 3)}, scaler skips {r['scaler_skipped_steps']}"
                         for dtype, r in check.items() if isinstance(r, dict) and "final_relative_difference" in r) \
            + f" ({check['steps']} steps)"
    if name == "host_sync":
        parts = []
        for dtype, r in check.items():
            if isinstance(r, dict) and "reads" in r:
                text = (f"{dtype}: {r['reads']['non_finite_guard']} guard reads / {r['steps']} steps, "
                        f"{r['reads']['logging']} log reads, unexpected {len(r['unexpected_sites'])}")
                if "cuda_sync_debug" in r:
                    text += f", CUDA syncs {r['cuda_sync_debug']['synchronisations']} (allowed {r['cuda_sync_debug']['allowed']})"
                parts.append(text)
        return "; ".join(parts)
    if name == "compile":
        return f"backend {check['backend']}, detections {_fmt(check['eval_detections']['passed'])}"
    return ""


def _correctness(section: dict) -> list:
    lines = ["| check | passed | figures | s |", "| --- | --- | --- | --- |"]
    for name, check in section.get("checks", {}).items():
        lines.append(f"| {name} | {_fmt(check.get('passed'))} | {_check_figures(name, check)} | "
                     f"{_fmt(check.get('wall_s'), 1)} |")
    for check in section.get("checks", {}).values():
        for dtype, r in check.items():
            if isinstance(r, dict):
                lines += [f"- unexpected host read ({dtype}): `{site}`" for site in r.get("unexpected_sites", [])]
    return lines


def _speed(section: dict) -> list:
    lines = [f"`{section.get('settings', '')}`", "",
             "| setting | batch | ours img/s | torchvision img/s | ours / torchvision | ours peak MiB | "
             "torchvision peak MiB |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in section.get("results", {}).items():
        if r.get("error"):
            lines.append(f"| {name} | | error | | | | |")
            continue
        batch = f"{r['batch_size']}" + (f" (lowered from {r['requested_batch_size']}: out of memory)"
                                        if r.get("lowered") else "")
        lines.append(f"| {name} | {batch} | {_fmt(r['ours_images_per_s'], 1)} | {_fmt(r['torchvision_images_per_s'], 1)}"
                     f" | {_fmt(r['ratio'])}x | {_fmt(r['ours_peak_mib'], 0)} | {_fmt(r['torchvision_peak_mib'], 0)} |")
    return lines


def _data(section: dict) -> list:
    lines = [f"{section.get('data', '')}, batch {section.get('batch_size')}, pin_memory {section.get('pin_memory')}, "
             f"{section.get('cpus')} CPUs", "", "| workers | images/s | ms / batch (median) | first batch s | "
             "loader / model |", "| --- | --- | --- | --- | --- |"]
    for r in section.get("results", {}).values():
        if "images_per_s" in r:
            lines.append(f"| {r['workers']} | {r['images_per_s']:.1f} | {r['median_batch_ms']:.1f} | "
                         f"{r['first_batch_s']:.2f} | {_fmt(r.get('loader_over_model'))} |")
    if section.get("verdict"):
        lines += ["", f"Model: {section['model_train_images_per_s']['images_per_s']:.1f} training images/s "
                      f"({section['model_train_images_per_s']['setting']}, part 2). {section['verdict']}."]
    return lines


def _learning(section: dict) -> list:
    metrics = section.get("metrics") or {}
    lines = [f"`{section.get('command', '')}`", "",
             "| iterations | train.py s (start to end) | train img/s (median) | AP | AP50 | AP75 |", "| --- | --- | --- | --- | --- | --- |",
             f"| {_fmt(section.get('iterations'))} | {_fmt(section.get('train_wall_s'), 1)} | "
             f"{_fmt(section.get('train_images_per_s_median'), 1)} | {_fmt(metrics.get('AP'), 3)} | "
             f"{_fmt(metrics.get('AP50'), 3)} | {_fmt(metrics.get('AP75'), 3)} |", ""]
    if section.get("amp_check"):
        lines.append(f"train.py's AMP self-check: {section['amp_check']}")
    if section.get("reference"):
        lines.append(f"Reference: {section['reference']}.")
    return lines


def render_markdown(report: dict) -> str:
    meta = report.get("meta", {})
    device = meta.get("gpu") or meta.get("device", "?")
    lines = [f"# GPU check: {device}", "",
             f"torch {meta.get('torch')}, CUDA {meta.get('cuda', 'n/a')}, cuDNN {meta.get('cudnn', 'n/a')}, "
             f"{meta.get('cpus')} CPUs, commit {str(meta.get('git_commit'))[:10]}, {meta.get('started')}, "
             f"{_fmt(meta.get('wall_s'), 0)} s in all{' (smoke sizes)' if meta.get('smoke') else ''}", "",
             f"`{meta.get('command', '')}`", ""]
    summary = report.get("summary", {})
    if summary:
        lines += [f"**Result: {'all checks passed' if summary.get('ok') else 'see below'}**"
                  + (f"; failed: {', '.join(summary['failed_checks'])}" if summary.get("failed_checks") else "")
                  + (f"; errors in: {', '.join(summary['parts_with_errors'])}" if summary.get("parts_with_errors")
                     else ""), ""]
    titles = {"correctness": ("1. Correctness: device against CPU", _correctness),
              "speed": ("2. Speed: ours against torchvision (benchmarks/benchmark.py)", _speed),
              "data": ("3. Data loading (benchmarks/data_benchmark.py)", _data),
              "learning": ("4. Learning: train.py, demo recipe", _learning)}
    for part, (title, body) in titles.items():
        section = report.get(part, {})
        lines += [f"## {title}: {section.get('status', 'not run')} "
                  f"({_fmt(section.get('wall_s'), 1)} s of {_fmt(section.get('cap_s'), 0)})", ""]
        if section.get("status") not in ("not run", "skipped"):
            try:
                lines += body(section)
            except (KeyError, TypeError, ValueError) as exc:  # a half-written section still renders
                lines.append(f"(incomplete section: {type(exc).__name__} {exc})")
        lines += [""] + _skipped_and_errors(section) + [""]
    return "\n".join(lines)
