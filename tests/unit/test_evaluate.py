import pytest

from ray_ft.evaluate import exact_match, normalize_answer, rouge_l


def test_rouge_l_keeps_vietnamese_words():
    ref = "LoRA thêm ma trận hạng thấp vào mô hình."
    assert rouge_l([ref], [ref]) == pytest.approx(1.0)
    assert rouge_l(["ma trận hạng thấp"], [ref]) == pytest.approx(2 * 4 / 9 * 1.0 / (4 / 9 + 1.0))
    assert rouge_l(["hoàn toàn khác"], [ref]) == 0.0


def test_exact_match_ignores_case_and_punctuation():
    assert exact_match(["Năm 2018."], ["năm 2018"]) == 1.0
    assert exact_match(["Năm 2019"], ["năm 2018"]) == 0.0
    assert normalize_answer("  Xin   CHÀO! ") == "xin chào"
