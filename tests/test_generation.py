"""verl_ext.generation: prompts, batched sampling with transformers on a tiny random Qwen2, backends."""

from __future__ import annotations

import pytest
import torch

from verl_ext.core.models import cut_at_eos
from verl_ext.core.prompts import PROMPT_SUFFIX, encode_problem, format_problem, problem_to_messages
from verl_ext.core.sampling import left_pad
from verl_ext.generation import Generation, resolve_backend, sample_responses

torch.set_num_threads(1)  # tiny matrices: threads only add contention on a shared CPU

CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
SPECIALS = ["<pad>", "<eos>", "<user>", "<assistant>", "<unk>"]
TEMPLATE = (
    "{% for m in messages %}{{ '<user>' if m['role'] == 'user' else '<assistant>' }}{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tiny_tokenizer():
    """Character-level tokenizer with a chat template, built offline with `tokenizers`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + CHARS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                  additional_special_tokens=["<user>", "<assistant>"], padding_side="left")
    tok.chat_template = TEMPLATE
    return tok


def tiny_model(tokenizer, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


def test_prompt_format_has_the_paper_suffix(tok):
    assert PROMPT_SUFFIX == "Please reason step by step, and put your final answer within \\boxed{}."
    assert format_problem("  What is 1+1? ") == "What is 1+1?\n" + PROMPT_SUFFIX
    assert problem_to_messages("Q") == [{"role": "user", "content": "Q\n" + PROMPT_SUFFIX}]
    ids = encode_problem(tok, "Q")
    assert tok.decode(ids) == "<user>Q\n" + PROMPT_SUFFIX + "<eos><assistant>"
    with pytest.raises(ValueError, match="problem must be a non-empty string"):
        format_problem("  ")


def test_missing_chat_template_is_a_clear_error():
    plain = tiny_tokenizer()
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode_problem(plain, "Q")
    assert plain.decode(encode_problem(plain, "Q", use_chat_template=False)) == "Q\n" + PROMPT_SUFFIX


def test_helpers():
    ids, mask = left_pad([[1, 2, 3], [4]], 0)
    assert (ids.tolist(), mask.tolist()) == ([[1, 2, 3], [0, 0, 4]], [[1, 1, 1], [0, 0, 1]])
    assert left_pad([[4]], 0, min_width=3)[0].tolist() == [[0, 0, 4]]
    assert cut_at_eos([5, 6, 2, 7, 2], [2]) == ([5, 6, 2], "stop")
    assert cut_at_eos([5, 6], [2, 3]) == ([5, 6], "length")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n": 0}, "n=0"),
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_k": 0}, "top_k=0"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"backend": "tgi"}, "backend='tgi' is invalid; valid choices: hf, vllm, auto"),
    ],
)
def test_bad_arguments_are_named(tok, model, kwargs, match):
    args = {"n": 2, "max_new_tokens": 4}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sample_responses(model, tok, [[1, 2]], show_progress=False, **args)


def test_sampling_shape_order_eos_and_determinism(tok, model):
    prompts = [encode_problem(tok, "1+1"), encode_problem(tok, "a much longer problem statement here")]
    kwargs = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 12, "seed": 3, "batch_size": 3, "show_progress": False}
    out = sample_responses(model, tok, prompts, 4, **kwargs)
    assert [(g.prompt_index, g.sample_index) for g in out] == [(p, s) for p in range(2) for s in range(4)]
    for g in out:
        assert isinstance(g, Generation) and g.prompt_ids == prompts[g.prompt_index]
        assert 1 <= len(g.response_ids) <= 12
        if g.finish_reason == "stop":
            assert g.response_ids[-1] == tok.eos_token_id and tok.eos_token_id not in g.response_ids[:-1]
        else:
            assert g.finish_reason == "length" and len(g.response_ids) == 12
        assert g.response_text == tok.decode(g.response_ids, skip_special_tokens=True)
    again = sample_responses(model, tok, prompts, 4, **kwargs)
    assert [g.response_ids for g in again] == [g.response_ids for g in out]
    other = sample_responses(model, tok, prompts, 4, **{**kwargs, "seed": 4})
    assert [g.response_ids for g in other] != [g.response_ids for g in out]
    assert len({tuple(g.response_ids) for g in out}) > 1  # samples differ


def test_left_padding_does_not_change_greedy_output(tok, model):
    """A prompt batched with a longer one (so left-padded) decodes as it does alone."""
    short, long = encode_problem(tok, "2+2"), encode_problem(tok, "a considerably longer prompt to force padding")
    kwargs = {"temperature": 0.0, "max_new_tokens": 8, "show_progress": False}
    alone = sample_responses(model, tok, [short], 1, batch_size=1, **kwargs)[0]
    together = sample_responses(model, tok, [short, long], 1, batch_size=2, **kwargs)[0]
    assert together.response_ids == alone.response_ids


def test_model_path_and_tokenizer_loaded_from_it(tok, model, tmp_path):
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prompts = [encode_problem(tok, "1+2")]
    kwargs = {"temperature": 1.0, "max_new_tokens": 6, "seed": 0, "show_progress": False}
    from_path = sample_responses(str(tmp_path), None, prompts, 2, **kwargs)
    in_memory = sample_responses(model, tok, prompts, 2, **kwargs)
    assert [g.response_ids for g in from_path] == [g.response_ids for g in in_memory]


def test_vllm_backend_missing_is_a_clear_error(tok, monkeypatch):
    from verl_ext import vllm_cpu

    monkeypatch.setattr(vllm_cpu, "vllm_importable", lambda: False)
    with pytest.raises(ImportError, match=r"backend=vllm needs vLLM \(vLLM not installed\): run `bash scripts/install.sh`"):
        sample_responses("some/model", tok, [[1]], 1, max_new_tokens=2, backend="vllm", show_progress=False)


def test_auto_backend_is_vllm_wherever_it_is_installed(monkeypatch):
    from verl_ext import vllm_cpu

    monkeypatch.setattr(vllm_cpu, "vllm_importable", lambda: True)
    monkeypatch.setattr(vllm_cpu, "vllm_distribution_version", lambda: "0.27.0+cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto") == "vllm"
    monkeypatch.setattr(vllm_cpu, "vllm_importable", lambda: False)
    assert resolve_backend("auto") == "hf"
