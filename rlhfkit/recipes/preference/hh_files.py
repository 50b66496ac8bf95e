"""Where the HH-RLHF comparisons live: the offline split files and the Hub name, and the `hh_data` setting's
parsing (light: no model or data library is imported, so settings are checked fast)."""

from __future__ import annotations

from pathlib import Path

from rlhfkit.paths import shared_data_dir

HH_RLHF_HUB_NAME = "Anthropic/hh-rlhf"
HH_RLHF_FILES = (
    "harmless-base-test.jsonl.gz",
    "helpful-base-test.jsonl.gz",
    "helpful-online-test.jsonl.gz",
    "helpful-rejection-sampled-test.jsonl.gz",
)


def hh_data_files(spec: str | None) -> list[Path] | str | None:
    """A comma-separated list of HH-RLHF files as `load_hh_rlhf_rows` takes it: each item a path or the name
    of an offline split ("helpful-base" -> shared_data_dir()/hh-rlhf/helpful-base-test.jsonl.gz); None stays
    None (all offline splits) and "Anthropic/hh-rlhf" stays the Hub name."""
    if spec is None or spec == HH_RLHF_HUB_NAME:
        return spec
    offline = {name.removesuffix("-test.jsonl.gz"): name for name in HH_RLHF_FILES}
    files = []
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        if item in offline:
            files.append(shared_data_dir() / "hh-rlhf" / offline[item])
        elif Path(item).suffix in (".jsonl", ".gz"):
            files.append(Path(item))
        else:
            raise ValueError(
                f"hh_data: {item!r} is neither an offline split ({', '.join(offline)}) nor a .jsonl/.jsonl.gz file path"
            )
    if not files:
        raise ValueError(f"hh_data: no files in {spec!r}")
    return files
