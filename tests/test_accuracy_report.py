"""astra bench accuracy: its tables and plot from rows (the study itself runs minutes
to hours: bench/RESULTS.md has its numbers)."""
from astra.bench import accuracy


def _rows():
    rows = [dict(model="digits-vit", devices=1, groups=0, codebook_size=0, method="single",
                 metric="top1", value=0.97, seed=None)]
    for seed, (p, f) in enumerate([(0.95, 0.96), (0.93, 0.98), (0.94, 0.97)]):
        rows.append(dict(model="digits-vit", devices=4, groups=1, codebook_size=1024,
                         method="post_training", metric="top1", value=p, seed=seed))
        rows.append(dict(model="digits-vit", devices=4, groups=1, codebook_size=1024,
                         method="finetuned", metric="top1", value=f, seed=seed))
        for lam, v in ((0.0, 0.5 + seed * 0.01), (1.0, 0.4)):
            rows.append(dict(model="digits-vit", devices=4, groups=1, codebook_size=1024,
                             method=f"naq_lambda={lam:g}", metric="nll", value=v, seed=seed))
            rows.append(dict(model="digits-vit", devices=4, groups=1, codebook_size=1024,
                             method=f"naq_lambda={lam:g}", metric="top1", value=1 - v / 10,
                             seed=seed))
    rows.append(dict(model="byte-gpt2", devices=4, groups=32, codebook_size=1024,
                     method="post_training", metric="perplexity", value=8.5, seed=0))
    return rows


def test_tables_give_mean_and_half_range_over_seeds():
    md = accuracy.tables(_rows())
    assert "| 1 | 1024 | 10 | top1 | 0.9700 | - | 0.9400 ± 0.0100 | 0.9700 ± 0.0100 | 3 |" in md
    assert "(G=1, K=1024: 10 bits/token" in md
    assert "| naq_lambda=0 | 4 | 0.9490 ± 0.0010 | 0.5100 ± 0.0100 | 3 |" in md
    assert "| naq_lambda=1 | 4 | 0.9600 ± 0.0000 | 0.4000 ± 0.0000 | 3 |" in md
    assert "| 32 | 1024 | 320 | perplexity | - | - | 8.5000 | - | 1 |" in md


def test_plot_writes_a_png(tmp_path):
    accuracy.plot(_rows(), tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_rejects_unknown_models_and_bad_grids(tmp_path, capsys):
    from astra.cli import main
    assert main(["bench", "accuracy", "--models", "resnet", "--out", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["bench", "accuracy", "--grid", "1x", "--out", str(tmp_path)]) == 2
    assert "--grid must be" in capsys.readouterr().err
