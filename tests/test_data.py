"""Datasets: loss masks cover exactly the trained tokens; bad lines name file and line."""

import json

import pytest

from qatctl import data
from qatctl.errors import QatctlError
from qatctl.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def trained_text(tok, ex):
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=False) if lab != data.IGNORE])


def test_chat_mask_covers_assistant_turns_only(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6"}]
    ex = data.tokenize_sft(tok, "x:1", {"messages": msgs}, 512)
    assert ex.labels[: len(ex.input_ids)] and len(ex.labels) == len(ex.input_ids)
    # Exactly the two assistant bodies and their end-of-turn markers are trained.
    assert trained_text(tok, ex) == "4<|im_end|>\n6<|im_end|>\n"
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    assert [lab for lab in ex.labels if lab != data.IGNORE] == [t for t, lab in zip(ex.input_ids, ex.labels, strict=False)
                                                                   if lab != data.IGNORE]


def test_prompt_completion_mask_and_eos(tok):
    ex = data.tokenize_sft(tok, "x:1", {"prompt": "Q: 1+1=", "completion": " 2"}, 512)
    assert trained_text(tok, ex) == " 2<|im_end|>"
    assert ex.input_ids[-1] == tok.eos_token_id and not ex.truncated


def test_truncation_is_reported(tok):
    ex = data.tokenize_sft(tok, "x:1", {"prompt": "ab", "completion": "x" * 50}, 10)
    assert ex.truncated and len(ex.input_ids) == 10
    with pytest.raises(QatctlError, match="no trained token left"):
        data.tokenize_sft(tok, "x:1", {"prompt": "a" * 20, "completion": "b"}, 10)


def test_collate_pads_right_and_masks(tok):
    a = data.tokenize_sft(tok, "x:1", {"prompt": "a", "completion": "bc"}, 64)
    b = data.tokenize_sft(tok, "x:2", {"prompt": "abcdef", "completion": "g"}, 64)
    ids, labels, mask = data.collate([a, b], pad_id=0)
    assert ids.shape == (2, len(b.input_ids))
    assert mask[0].tolist() == [1] * len(a.input_ids) + [0] * (len(b.input_ids) - len(a.input_ids))
    assert (labels[0, len(a.input_ids):] == data.IGNORE).all()


@pytest.mark.parametrize("line, message", [
    ("{not json", "x.jsonl:2: not valid JSON"),
    ("[1, 2]", "x.jsonl:2: expected a JSON object"),
    ({"text": "hi"}, "x.jsonl:2: expected 'messages' or 'prompt' + 'completion'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "x.jsonl:2: no assistant message"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "x.jsonl:2: messages[0].role 'robot'"),
    ({"prompt": 3, "completion": "x"}, "x.jsonl:2: 'prompt' and 'completion' must be strings"),
])
def test_bad_lines_name_file_and_line(tmp_path, tok, line, message):
    path = write(tmp_path / "x.jsonl", [{"prompt": "a", "completion": "b"}, line])
    with pytest.raises(QatctlError) as e:
        data.load_sft(path, tok, 64)
    assert message in str(e.value)


def test_prompts_drop_trailing_assistant_and_need_answers(tmp_path, tok):
    path = write(tmp_path / "p.jsonl", [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "answer": 4},
        {"prompt": "3+3=", "answer": "6"}])
    ps = data.load_prompts(path, tok)
    assert ps[0].text == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n" and ps[0].answer == "4"
    assert ps[1].index == 1 and ps[1].answer == "6"
    write(path, [{"prompt": "3+3="}])
    with pytest.raises(QatctlError, match=r"p.jsonl:1: missing 'answer'"):
        data.load_prompts(path, tok)
    assert data.load_prompts(path, tok, need_answer=False)[0].answer is None


def _make_arith():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("make_arith", REPO / "recipes/data/make_arith.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arith_data_is_what_the_generator_writes(tmp_path):
    """recipes/data is reproducible from its generator, and its four splits pass the checks."""
    import subprocess
    import sys

    from conftest import REPO

    subprocess.run([sys.executable, REPO / "recipes/data/make_arith.py", "--out", tmp_path], check=True,
                   capture_output=True)
    gen = _make_arith()
    splits = {}
    for name, file in gen.FILES.items():
        assert (tmp_path / file).read_bytes() == (REPO / "recipes/data" / file).read_bytes(), file
        splits[name] = [json.loads(ln) for ln in (tmp_path / file).read_text().splitlines()]
    assert gen.check_splits(splits) == []
    assert {n: len(r) for n, r in splits.items()} == gen.SIZES and gen.SIZES["test"] >= 600
    for name, rows in splits.items():  # the same mix in every split, and in both halves of train
        ops = [gen.problem_key(r)[0] for r in rows]
        assert {op: ops.count(op) / len(ops) for op in "+-*"} == pytest.approx(gen.MIX, abs=0.003), name
    half = [gen.problem_key(r)[0] for r in splits["train"][:1500]]
    assert half.count("*") / 1500 == pytest.approx(0.2, abs=0.04)  # shuffled: no drift along the file
    assert any(int(r["answer"]) < 0 for r in splits["test-oot"])
    assert not any(int(r["answer"]) < 0 for n in ("train", "val", "test") for r in splits[n])


def test_the_split_checks_catch_each_leak():
    """check_splits can fail: a shared problem, an operand-swapped twin, an out-of-template wording
    in train, and a split without one operation are each reported."""
    import copy

    gen = _make_arith()
    good = gen.make(seed=7, sizes={"train": 300, "val": 50, "test": 100, "test-oot": 60})
    assert gen.check_splits(good) == []

    leak = copy.deepcopy(good)
    leak["test"][0] = copy.deepcopy(leak["train"][0])
    assert any("is also in" in p for p in gen.check_splits(leak))

    twin = copy.deepcopy(good)
    r = next(x for x in twin["test"] if gen.problem_key(x)[0] == "+" and gen.problem_key(x)[1] != gen.problem_key(x)[2])
    _, a, b = gen.problem_key(r)
    first = twin["train"][0]
    first["messages"][0]["content"] = f"What is {b} + {a}?" if a < b else f"What is {a} + {b}?"
    first["messages"][1]["content"] = f"{max(a, b)} + {min(a, b)} = {a + b}\nAnswer: {a + b}"
    assert any("twin" in p for p in gen.check_splits(twin))

    wording = copy.deepcopy(good)
    wording["train"].append(copy.deepcopy(wording["test-oot"][0]))
    assert any("is in train" in p for p in gen.check_splits(wording))

    no_mul = copy.deepcopy(good)
    no_mul["val"] = [x for x in no_mul["val"] if gen.problem_key(x)[0] != "*"]
    assert any("'*'" in p for p in gen.check_splits(no_mul))
