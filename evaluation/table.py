"""Fixed-width text tables of metrics, for printing results in a terminal."""

from __future__ import annotations

from collections.abc import Mapping


def _pivot(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    # "ndcg@10" -> row "ndcg", column "@10"; a name without a cutoff goes in column "value".
    rows: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
        family, at, cutoff = name.partition("@")
        rows.setdefault(family, {})[f"@{cutoff}" if at else "value"] = value
    return rows


def format_table(
    rows: Mapping[str, Mapping[str, float]] | Mapping[str, float],
    *,
    precision: int = 4,
    corner: str = "metric",
) -> str:
    """Render metrics as a fixed-width table.

    A flat mapping such as ``retrieval_metrics`` output (``{"ndcg@10": 0.41, ...}``) becomes one
    row per metric family and one column per cutoff; names without ``@`` (``"spearman"``) go in a
    ``value`` column. A nested mapping (row label -> column label -> value, e.g. one row per model)
    is laid out as given. Columns keep their order of first appearance; missing cells show ``-``.

    Args:
        rows: flat metric name -> value, or row label -> column label -> value.
        precision: digits after the decimal point.
        corner: header of the row-label column.

    Returns:
        The table, one line per row after a header and a rule, without a trailing newline.
    """
    if not rows:
        raise ValueError("no metrics to format")
    nested = [isinstance(value, Mapping) for value in rows.values()]
    if all(nested):
        table = {str(label): dict(cells) for label, cells in rows.items()}
    elif not any(nested):
        table = _pivot(rows)
    else:
        raise ValueError("rows must map either all to numbers or all to mappings")

    columns = list(dict.fromkeys(column for cells in table.values() for column in cells))
    body = [
        [label, *(f"{cells[c]:.{precision}f}" if c in cells else "-" for c in columns)]
        for label, cells in table.items()
    ]
    header = [corner, *columns]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def render(line: list[str]) -> str:
        first = line[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = ["-" * width for width in widths]
    return "\n".join(render(line) for line in [header, rule, *body])
