"""GLUE task registry, local file loading (GLUE TSV and Hugging Face column layouts) and the metrics,
each metric against an independent formula on fresh random cases."""

import json
import math

import pytest
import torch

from kdfast.train.glue import (
    GLUE_TASKS,
    accuracy,
    average_ranks,
    binary_f1,
    compute_metrics,
    find_split_files,
    get_task,
    load_split,
    matthews_corrcoef,
    pearson_corrcoef,
    spearman_corrcoef,
)
from tests.train.glue_data import NLI_LABELS, write_mnli, write_sst2

# ---- metrics -------------------------------------------------------------------------------------


def _counts(pred, labels):
    tp = sum(1 for p, t in zip(pred, labels) if p == 1 and t == 1)
    tn = sum(1 for p, t in zip(pred, labels) if p == 0 and t == 0)
    fp = sum(1 for p, t in zip(pred, labels) if p == 1 and t == 0)
    fn = sum(1 for p, t in zip(pred, labels) if p == 0 and t == 1)
    return tp, tn, fp, fn


@pytest.mark.parametrize("n", [7, 50, 301])
def test_binary_metrics_match_confusion_counts(n):
    for _ in range(5):
        labels = torch.randint(0, 2, (n,)).tolist()
        pred = torch.randint(0, 2, (n,)).tolist()
        tp, tn, fp, fn = _counts(pred, labels)
        assert accuracy(pred, labels) == pytest.approx((tp + tn) / n, abs=1e-12)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert binary_f1(pred, labels) == pytest.approx(f1, abs=1e-12)
        denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        mcc = (tp * tn - fp * fn) / denom if denom else 0.0
        assert matthews_corrcoef(pred, labels) == pytest.approx(mcc, abs=1e-12)


def test_multiclass_mcc_is_the_correlation_of_one_hot_codes():
    for k in (3, 5):
        n = 97
        labels = torch.randint(0, k, (n,))
        pred = torch.where(torch.rand(n) < 0.6, labels, torch.randint(0, k, (n,)))
        x = torch.nn.functional.one_hot(pred, k).double()
        y = torch.nn.functional.one_hot(labels, k).double()
        xc, yc = x - x.mean(0), y - y.mean(0)
        expected = float((xc * yc).sum() / torch.sqrt((xc * xc).sum() * (yc * yc).sum()))
        assert matthews_corrcoef(pred, labels) == pytest.approx(expected, abs=1e-12)


def test_degenerate_cases_follow_the_documented_conventions():
    labels = torch.randint(0, 2, (20,))
    labels[0], labels[1] = 0, 1
    assert matthews_corrcoef(torch.ones(20, dtype=torch.long), labels) == 0.0  # one predicted class
    assert binary_f1(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long)) == 0.0
    assert matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert matthews_corrcoef(1 - labels, labels) == pytest.approx(-1.0)
    assert pearson_corrcoef(torch.full((6,), 2.5), torch.randn(6)) == 0.0


def test_pearson_matches_the_sum_formula():
    for n in (3, 40, 500):
        x, y = torch.randn(n, dtype=torch.float64) * 3 + 1, torch.randn(n, dtype=torch.float64)
        y = y + 0.5 * x
        sx, sy, sxy, sxx, syy = x.sum(), y.sum(), (x * y).sum(), (x * x).sum(), (y * y).sum()
        expected = (n * sxy - sx * sy) / torch.sqrt((n * sxx - sx**2) * (n * syy - sy**2))
        assert pearson_corrcoef(x, y) == pytest.approx(float(expected), abs=1e-9)
        assert pearson_corrcoef(x.float(), y.float()) == pytest.approx(float(expected), abs=1e-5)


def test_spearman_without_ties_is_the_rank_difference_formula():
    n = 60
    x, y = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    y = y + x
    rx = torch.empty(n, dtype=torch.float64)
    rx[x.argsort()] = torch.arange(1, n + 1, dtype=torch.float64)
    ry = torch.empty(n, dtype=torch.float64)
    ry[y.argsort()] = torch.arange(1, n + 1, dtype=torch.float64)
    expected = 1 - 6 * float(((rx - ry) ** 2).sum()) / (n * (n * n - 1))
    assert spearman_corrcoef(x, y) == pytest.approx(expected, abs=1e-9)
    # a rank statistic: unchanged by a strictly increasing transform of either side
    assert spearman_corrcoef(x.exp(), y**3) == pytest.approx(expected, abs=1e-9)


def test_spearman_with_ties_uses_average_ranks():
    n = 45
    x = torch.randint(0, 6, (n,)).double()  # many ties, as STS-B's 0..5 scores have
    y = x + torch.randint(-2, 3, (n,)).double()

    def counted_ranks(values):  # average rank by counting: #{smaller} + (#{equal} + 1) / 2
        v = values.tolist()
        return torch.tensor([sum(u < a for u in v) + (sum(u == a for u in v) + 1) / 2 for a in v], dtype=torch.float64)

    rx, ry = counted_ranks(x), counted_ranks(y)
    assert torch.equal(average_ranks(x), rx)
    rxc, ryc = rx - rx.mean(), ry - ry.mean()
    expected = float((rxc * ryc).sum() / torch.sqrt((rxc**2).sum() * (ryc**2).sum()))
    assert spearman_corrcoef(x, y) == pytest.approx(expected, abs=1e-12)


def test_compute_metrics_gives_each_task_its_glue_metrics():
    assert set(compute_metrics(get_task("cola"), [0, 1, 1], [0, 1, 0])) == {"matthews_corr"}
    assert set(compute_metrics(get_task("mrpc"), [0, 1, 1], [0, 1, 0])) == {"f1", "accuracy"}
    assert set(compute_metrics(get_task("STS-B"), [0.1, 2, 3], [0, 1, 4.5])) == {"pearson", "spearman"}
    for name in ("sst2", "mnli", "qnli", "rte", "wnli"):
        assert set(compute_metrics(get_task(name), [0, 1], [1, 1])) == {"accuracy"}


def test_metric_input_errors():
    with pytest.raises(ValueError, match="predictions is empty"):
        accuracy([], [])
    with pytest.raises(ValueError, match="predictions has 3 entries but labels has 2"):
        matthews_corrcoef([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="task must be one of"):
        get_task("squad")


# ---- files ---------------------------------------------------------------------------------------


def test_sst2_glue_tsv_loads_with_its_labels(tmp_path):
    d = write_sst2(tmp_path / "sst2", n_train=23, n_dev=11)
    files = find_split_files(get_task("sst2"), d)
    assert set(files) == {"train", "dev"}
    ex = load_split(get_task("sst2"), files["dev"])
    rows = [line.split("\t") for line in (d / "dev.tsv").read_text().splitlines()[1:]]
    assert ex.texts == ([r[0] for r in rows],) and ex.labels == [int(r[1]) for r in rows]


def test_mnli_glue_tsv_reads_sentence_columns_and_gold_label(tmp_path):
    d = write_mnli(tmp_path / "mnli")
    task = get_task("mnli")
    files = find_split_files(task, d)
    assert set(files) == {"train", "dev_matched", "dev_mismatched"}
    for split in files:
        lines = files[split].read_text().splitlines()
        header = lines[0].split("\t")
        rows = [line.split("\t") for line in lines[1:]]
        ex = load_split(task, files[split])
        assert ex.texts == ([r[header.index("sentence1")] for r in rows], [r[header.index("sentence2")] for r in rows])
        assert ex.labels == [NLI_LABELS.index(r[header.index("gold_label")]) for r in rows]


def test_hf_column_layouts_csv_and_jsonl(tmp_path):
    # premise / hypothesis / int label as the Hugging Face glue dataset has them, as JSON lines
    d = tmp_path / "mnli_hf"
    d.mkdir()
    recs = {}
    for split in ("train", "validation_matched", "validation_mismatched"):
        recs[split] = [{"premise": f"the cat {i}", "hypothesis": f"a dog {i}", "label": int(torch.randint(0, 3, ())),
                        "idx": i} for i in range(5)]
        (d / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in recs[split]) + "\n")
    task = get_task("mnli")
    files = find_split_files(task, d)
    ex = load_split(task, files["dev_mismatched"])
    assert ex.labels == [r["label"] for r in recs["validation_mismatched"]]
    assert ex.texts[1] == [r["hypothesis"] for r in recs["validation_mismatched"]]
    # STS-B as CSV with HF columns: float labels, a numeric-looking sentence stays text
    s = tmp_path / "stsb"
    s.mkdir()
    scores = (torch.rand(4) * 5).tolist()
    body = "\n".join(f'"1984",b {i},{v:.3f},{i}' for i, v in enumerate(scores))
    for split in ("train", "dev"):
        (s / f"{split}.csv").write_text("sentence1,sentence2,label,idx\n" + body + "\n")
    ex = load_split(get_task("stsb"), s / "dev.csv")
    assert ex.texts[0] == ["1984"] * 4
    assert ex.labels == pytest.approx([round(v, 3) for v in scores])


def test_original_mrpc_qnli_and_headerless_cola(tmp_path):
    mrpc = tmp_path / "mrpc.tsv"
    mrpc.write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t12\t13\tHe said \"yes.\tHe agreed\n"
                    "0\t14\t15\tA cat\tA dog\n")
    ex = load_split(get_task("mrpc"), mrpc)
    assert ex.texts == (['He said "yes.', "A cat"], ["He agreed", "A dog"]) and ex.labels == [1, 0]
    qnli = tmp_path / "qnli.tsv"
    qnli.write_text("index\tquestion\tsentence\tlabel\n0\tWho?\tHim.\tnot_entailment\n1\tWhat?\tIt.\tentailment\n")
    assert load_split(get_task("qnli"), qnli).labels == [1, 0]
    cola = tmp_path / "cola.tsv"  # CoLA's train/dev TSVs have no header: source, label, original mark, sentence
    cola.write_text("gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n")
    ex = load_split(get_task("cola"), cola)
    assert ex.texts == (["Our friends won't buy this analysis.", "They drank the pub."],) and ex.labels == [1, 0]


def test_file_errors_name_the_problem(tmp_path):
    sst2 = get_task("sst2")
    with pytest.raises(ValueError, match="is not a directory"):
        find_split_files(sst2, tmp_path / "nowhere")
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    with pytest.raises(ValueError, match="no dev split for sst2"):
        find_split_files(sst2, d)
    (d / "dev.tsv").write_text("sentence\tlabel\nbad\t0\n")
    (d / "validation.jsonl").write_text('{"sentence": "bad", "label": 0}\n')
    with pytest.raises(ValueError, match="dev split twice"):
        find_split_files(sst2, d)
    with pytest.raises(ValueError, match="no dev_matched split for mnli"):
        find_split_files(get_task("mnli"), d)

    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\ngood\t1\n")
    with pytest.raises(ValueError, match=r"no text column \(expected one of \['sentence'\]"):
        load_split(sst2, bad)
    bad.write_text("sentence\tstars\ngood\t1\n")
    with pytest.raises(ValueError, match="no label column"):
        load_split(sst2, bad)
    bad.write_text("sentence\tlabel\ngood\t1\nbad\t2\n")
    with pytest.raises(ValueError, match="row 1 has label '2', outside the sst2 label set"):
        load_split(sst2, bad)
    bad.write_text("sentence\tlabel\ngood\tpositive-ish\n")
    with pytest.raises(ValueError, match="outside the sst2 label set"):
        load_split(sst2, bad)
    bad.write_text("sentence\tlabel\ngood\t\n")
    with pytest.raises(ValueError, match="row 0 has no label"):
        load_split(sst2, bad)
    bad.write_text("sentence1\tsentence2\tlabel\na\tb\t5.5\n")
    with pytest.raises(ValueError, match=r"outside the stsb label set \[0.0, 5.0\]"):
        load_split(get_task("stsb"), bad)
    bad.write_text("sentence\tlabel\n")
    with pytest.raises(ValueError, match="holds no examples"):
        load_split(sst2, bad)
    bad.write_text("sentence\tlabel\ngood\t1\nfine\t1\textra\n")
    with pytest.raises(ValueError, match="malformed"):
        load_split(sst2, bad)
    bad.write_bytes(b"sentence\tlabel\ncaf\xe9\t1\n")  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_split(sst2, bad)
    js = tmp_path / "bad.jsonl"
    js.write_text('{"sentence": "good", "label": 1}\n{"sentence": \n')
    with pytest.raises(ValueError, match="malformed"):
        load_split(sst2, js)
    with pytest.raises(ValueError, match="must end in one of"):
        (tmp_path / "x.txt").write_text("good\n")
        load_split(sst2, tmp_path / "x.txt")


def test_registry_covers_glue():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert get_task("stsb").num_labels == 1 and get_task("mnli").num_labels == 3
    assert get_task("SST-2") is GLUE_TASKS["sst2"]
