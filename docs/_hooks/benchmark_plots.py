"""MkDocs hook: the benchmark plots (`benchmarks/*.png`) served next to the
performance page, which includes `benchmarks/RESULTS.md` and so links them by bare
name. One copy of each plot stays in the repository, beside RESULTS.md."""

import pathlib
from typing import Any

from mkdocs.structure.files import File, Files


def on_files(files: Files, config: Any) -> Files:
    root = pathlib.Path(config["config_file_path"]).parent / "benchmarks"
    for png in sorted(root.glob("*.png")):
        files.append(
            File(
                png.name,
                src_dir=str(root),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files
