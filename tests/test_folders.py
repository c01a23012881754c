"""The first subfolders of a folder, which the hints of the DataModules (``data_dir`` one level off) and of model
loading (a ``pretrained`` folder above the model's) search."""

from __future__ import annotations

from pathlib import Path

from ecoflap_pl.folders import first_subfolders


def test_the_first_folders_by_name_without_hidden_ones_or_files(tmp_path: Path) -> None:
    for name in ("b", "a", ".git", ".cache", "c", "d"):
        (tmp_path / name).mkdir()
    (tmp_path / "0_file.json").write_text("{}", encoding="utf-8")
    assert first_subfolders(tmp_path, 3) == [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    assert first_subfolders(tmp_path, 10) == [tmp_path / name for name in ("a", "b", "c", "d")]
    assert first_subfolders(tmp_path / "a", 10) == []
