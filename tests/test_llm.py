"""LLM-assisted training: sequence construction, connector, frozen LLM, LoRA, loading errors (tiny random LMs)."""
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from htr.llm_assist import IGNORE, LLMAssist, LLMLoadError, QFormerConnector, build_llm_assist, build_lm_batch
from htr.llm_weights import write_tiny

TEXTS = ["A MOVE to stop Mr. Gaitskell", "is to be made"]
Q, T, D = 8, 16, 512  # small query / frame counts keep the tests fast; widths are the real ones


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llms")
    for kind in ("tiny-llama", "tiny-gpt2"):
        write_tiny(kind, root / kind)
    return root


def make_assist(path, feat_dim=D, **extra):
    cfg = OmegaConf.create({"name": str(path), "num_queries": Q, "qformer_layers": 1, "dtype": "fp32", **extra})
    return build_llm_assist(cfg, "cpu", feat_dim=feat_dim)


def test_lm_batch_layout():
    batch = build_lm_batch([[5, 6, 7], [8]], num_prefix=4, head_ids=[1, 9, 9], eos_id=2, pad_id=0,
                           bridge_ids=[3])
    # BOS, prompt x2, prefix x4, bridge, text, EOS, then padding
    assert (batch.prefix_start, batch.text_start) == (3, 8)
    assert batch.input_ids.tolist() == [[1, 9, 9, 0, 0, 0, 0, 3, 5, 6, 7, 2],
                                        [1, 9, 9, 0, 0, 0, 0, 3, 8, 2, 0, 0]]
    X = IGNORE
    assert batch.labels.tolist() == [[X, X, X, X, X, X, X, X, 5, 6, 7, 2],
                                     [X, X, X, X, X, X, X, X, 8, 2, X, X]]
    assert batch.attention_mask.tolist() == [[1] * 12, [1] * 10 + [0] * 2]


def test_lm_batch_without_bos_and_prompt():  # e.g. Qwen2: no BOS token
    batch = build_lm_batch([[5]], num_prefix=2, head_ids=[], eos_id=2, pad_id=2)
    assert batch.prefix_start == 0
    assert batch.input_ids.tolist() == [[2, 2, 5, 2]]
    assert batch.labels.tolist() == [[IGNORE, IGNORE, 5, 2]]


def test_labels_are_teacher_forced(model_dirs):
    """HF's loss with our unshifted labels == CE of logits at t-1 against the text/EOS token at t."""
    assist = make_assist(model_dirs / "tiny-llama", prompt="Transcribe:").eval()
    assert assist.lm.head_ids[0] == assist.lm.bos_id and len(assist.lm.head_ids) > 1 and not assist.lm.bridge_ids
    feats = torch.randn(2, T, D)
    loss = assist(feats, TEXTS)
    text_ids = assist.lm.encode(TEXTS)
    batch = build_lm_batch(text_ids, Q, assist.lm.head_ids, assist.lm.eos_id, assist.lm.pad_id)
    prefix = assist.connector(feats)  # (2, Q, H)
    embeds = assist.lm.embed(batch.input_ids)  # (2, L, H)
    embeds[:, batch.prefix_start:batch.prefix_start + Q] = prefix
    logits = assist.lm.model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits  # (2, L, V)
    start = batch.text_start
    pred, target = [], []
    for i, ids in enumerate(text_ids):
        pred.append(logits[i, start - 1:start + len(ids)])  # last prefix slot predicts the first text token
        target.append(torch.tensor(ids + [assist.lm.eos_id]))  # last text token predicts EOS
    expected = F.cross_entropy(torch.cat(pred), torch.cat(target))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("native", [True, False])
def test_llm_dtype_auto_is_bf16_where_native(model_dirs, monkeypatch, native):
    import utils
    monkeypatch.setattr(utils, "native_bf16", lambda device: native)
    assist = make_assist(model_dirs / "tiny-llama", dtype="auto")
    assert assist.lm.dtype == (torch.bfloat16 if native else torch.float32)
    loss = assist(torch.randn(2, T, D), TEXTS)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad is None for p in assist.lm.parameters())          # no gradient for the frozen weights
    assert all(p.grad is not None for p in assist.connector.parameters())
    assert assist.lm.model.config._attn_implementation == "eager"      # on the CPU: faster than sdpa here
    with pytest.raises(LLMLoadError, match="llm.dtype must be auto, bf16 or fp32"):
        make_assist(model_dirs / "tiny-llama", dtype="fp8")


def test_each_text_is_tokenised_once(model_dirs, monkeypatch):
    assist = make_assist(model_dirs / "tiny-llama")
    calls = []
    tokenizer = assist.lm.tokenizer
    monkeypatch.setattr(assist.lm, "tokenizer", lambda text, **kw: calls.append(text) or tokenizer(text, **kw))
    for _ in range(3):
        assist(torch.randn(2, T, D), TEXTS)
    assert sorted(calls) == sorted(TEXTS)


@pytest.mark.parametrize("kind, hidden", [("tiny-llama", 64), ("tiny-gpt2", 48)])
def test_load_by_name_and_connector_width(model_dirs, kind, hidden):
    assist = make_assist(model_dirs / kind)
    assert assist.lm.hidden_size == hidden
    assert assist.lm.pad_id is not None and assist.lm.bos_id is not None
    assert assist.connector(torch.randn(3, T, D)).shape == (3, Q, hidden)
    assert torch.isfinite(assist(torch.randn(2, T, D), TEXTS))
    assert not assist.lm.training
    assist.train()
    assert not assist.lm.model.training and assist.connector.training  # the LLM stays in eval mode


def test_gradients_reach_connector_and_features_only(model_dirs):
    assist = make_assist(model_dirs / "tiny-llama")
    frozen = {n: p.clone() for n, p in assist.lm.named_parameters()}
    assert not any(p.requires_grad for p in assist.lm.parameters())
    feats = torch.randn(2, T, D, requires_grad=True)
    opt = torch.optim.AdamW(assist.parameters(), lr=1e-2)
    assist(feats, TEXTS).backward()
    opt.step()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert all(p.grad is not None for p in assist.connector.parameters())
    for n, p in assist.lm.named_parameters():
        assert p.grad is None and torch.equal(p, frozen[n]), n


def test_compiled_llm_computes_what_eager_does(model_dirs):
    """llm.compile=true: the same loss and gradients as eager, also after the text length changes (dynamic shapes)."""
    eager, compiled = (make_assist(model_dirs / "tiny-llama", compile=c).eval() for c in (False, True))
    compiled.load_trainable_state_dict(eager.trainable_state_dict())
    for texts in (TEXTS, ["a line of text much longer than the two lines before it", "b"]):
        grads = []
        for assist in (eager, compiled):
            feats = torch.randn(2, T, D, generator=torch.Generator().manual_seed(0), requires_grad=True)
            loss = assist(feats, texts)
            loss.backward()
            grads.append([loss, feats.grad] + [p.grad for p in assist.connector.parameters()])
            assist.zero_grad()
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_compile_without_a_cpp_compiler_is_one_clear_error(model_dirs, monkeypatch):
    import shutil

    from utils import UserError
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="no C\\+\\+ compiler.*set llm.compile=false"):
        make_assist(model_dirs / "tiny-llama", compile=True)


def test_state_dict_holds_no_llm_weights(model_dirs, tmp_path):
    assist = make_assist(model_dirs / "tiny-llama")
    keys = set(assist.trainable_state_dict())
    assert keys == {"connector." + k for k in assist.connector.state_dict()}
    parent = torch.nn.ModuleDict({"assist": assist})  # also when nested in another module
    assert all(k.startswith("assist.connector.") for k in parent.state_dict())
    other = make_assist(model_dirs / "tiny-llama")
    other.load_trainable_state_dict(assist.trainable_state_dict())
    for k, v in other.state_dict().items():
        assert torch.equal(v, assist.state_dict()[k])


@pytest.mark.parametrize("kind, targets", [("tiny-llama", ["q_proj", "v_proj"]), ("tiny-gpt2", None)])
def test_lora_trainable_params(model_dirs, kind, targets):
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": targets}
    assist = make_assist(model_dirs / kind, lora=lora)
    trainable = {n for n, p in assist.named_parameters() if p.requires_grad}
    lora_names = {n for n in trainable if "lora_" in n}
    connector_names = {"connector." + n for n, _ in assist.connector.named_parameters()}
    assert lora_names and trainable == lora_names | connector_names
    assert set(assist.trainable_state_dict()) == trainable  # no frozen LLM weight or buffer
    assist(torch.randn(2, T, D), TEXTS).backward()
    assert all(p.grad is not None for n, p in assist.named_parameters() if n in lora_names)
    assist.train()
    dropouts = [m for n, m in assist.lm.model.named_modules() if n.endswith("lora_dropout")]
    assert dropouts and all(m.training for m in dropouts) and not assist.lm.model.base_model.training
    make_assist(model_dirs / kind, lora=lora).load_trainable_state_dict(assist.trainable_state_dict())


@pytest.mark.parametrize("targets, adapted", [
    ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    (r".*\.(q|v)_proj", {"q_proj", "v_proj"})])
def test_lora_targets_may_be_one_string_as_peft_reads_it(model_dirs, targets, adapted):
    """all-linear or a regex (a YAML string, not a list): every matching layer of the LM gets an adapter."""
    lora = {"enabled": True, "r": 4, "alpha": 8, "target_modules": targets}
    assist = make_assist(model_dirs / "tiny-llama", lora=lora)
    layers = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in assist.named_parameters() if ".lora_A." in n}
    assert layers == adapted
    make_assist(model_dirs / "tiny-llama", lora=lora).load_trainable_state_dict(assist.trainable_state_dict())


@pytest.mark.parametrize("targets", ["qkv_proj", ["q_proj", "no_such_layer"]])
def test_lora_targets_that_match_no_layer_are_one_clear_error(model_dirs, targets):
    with pytest.raises(LLMLoadError, match=r"llm.lora.target_modules=.* names no layer of .*all-linear"):
        make_assist(model_dirs / "tiny-llama", lora={"enabled": True, "target_modules": targets})


def test_missing_model_dir_raises_clear_error(tmp_path):
    missing = tmp_path / "no-such-llm"
    with pytest.raises(LLMLoadError, match="no-such-llm") as info:
        build_llm_assist({"name": str(missing), "num_queries": Q}, "cpu")
    assert "prepare_llm.py" in str(info.value)


def test_qlora_without_cuda_raises_clear_error(model_dirs):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(LLMLoadError, match="bitsandbytes"):
        make_assist(model_dirs / "tiny-llama", qlora=True)


@pytest.mark.parametrize("batch_size, ratio, expected", [(1, 0.125, 1), (7, 0.125, 1), (8, 0.125, 1),
                                                         (16, 0.125, 2), (20, 0.125, 2), (64, 0.125, 8),
                                                         (10, 1.0, 10), (10, 0.0, 0)])
def test_sample_indices(batch_size, ratio, expected):
    gen = torch.Generator().manual_seed(0)
    idx = LLMAssist.sample_indices(batch_size, ratio, gen)
    assert idx.dtype == torch.long and len(idx) == expected
    assert len(set(idx.tolist())) == expected and all(0 <= i < batch_size for i in idx.tolist())


def test_sample_indices_are_random():
    gen = torch.Generator().manual_seed(0)
    draws = {tuple(LLMAssist.sample_indices(32, 0.125, gen).tolist()) for _ in range(10)}
    assert len(draws) > 1


def test_feature_width_is_configurable(model_dirs):
    cfg = OmegaConf.create({"name": str(model_dirs / "tiny-llama"), "num_queries": Q})
    assist = build_llm_assist(cfg, "cpu", feat_dim=256)  # e.g. arch.rnn_hidden_size=128
    assert torch.isfinite(assist(torch.randn(2, T, 256), TEXTS))


def test_connector_param_count():
    n = sum(p.numel() for p in QFormerConnector(llm_hidden=3072).parameters())
    assert 9e6 < n < 11e6  # 6.3 M Q-Former (2 layers) + 3.7 M projection to H=3072


ANAGRAMS = ["stop the pots", "pots the stop", "the stop pots", "pots stop the"]  # the same characters


def one_hot_frames(texts, frames: int = 16) -> torch.Tensor:
    """The positive control: one frame per character of the line (one-hot), blank frames after it. (B, T, C)"""
    chars = sorted(set("".join(texts)))
    feats = torch.zeros(len(texts), frames, len(chars) + 1)
    for b, text in enumerate(texts):
        for t in range(frames):
            feats[b, t, chars.index(text[t]) + 1 if t < len(text) else 0] = 1
    return feats


@pytest.mark.parametrize("connector", [{"connector": "qformer", "frame_positions": True},
                                       {"connector": "frame_stack", "frame_stack": 2}], ids=["qformer", "frame_stack"])
def test_connector_learns_to_read_the_line_not_just_the_set(model_dirs, connector):
    """Lines of the same characters in another order: the connector must tell them apart by where each character
    is. L_LLM has to fall below the shuffled-prefix loss (another line's prefix), not only below text-only, and the
    frozen LM's greedy reading from the prefix alone has to improve on that of the untrained connector."""
    from htr.metrics import corpus_cer
    torch.manual_seed(0)
    feats = one_hot_frames(ANAGRAMS)
    assist = make_assist(model_dirs / "tiny-llama", feats.shape[2], prefix_norm=True, **connector)
    before = corpus_cer(ANAGRAMS, assist.eval().read(feats, max_new_tokens=12))
    opt = torch.optim.AdamW(assist.trainable_parameters(), lr=1e-3)
    for _ in range(250):
        loss = assist.train()(feats, ANAGRAMS)
        opt.zero_grad()
        loss.backward()
        opt.step()
    report = assist.eval().diagnostics(feats, ANAGRAMS)
    assert report["llm"] < 0.1 * report["llm_text_only"], report
    assert report["llm_shuffled"] - report["llm"] > 0.5, report
    assert corpus_cer(ANAGRAMS, assist.read(feats, max_new_tokens=12)) < min(0.5, before)


def test_connector_without_frame_positions_is_blind_to_frame_order(model_dirs):
    """The seed's connector (llm.frame_positions=false): keys and values are a Linear of each frame, so permuting
    the frames leaves the prefix unchanged, and lines of the same characters get the same prefix."""
    feats = one_hot_frames(ANAGRAMS)
    perm = torch.randperm(feats.shape[1], generator=torch.Generator().manual_seed(0))
    for positions, same in ((False, True), (True, False)):
        connector = make_assist(model_dirs / "tiny-llama", feats.shape[2], frame_positions=positions).connector.eval()
        with torch.no_grad():
            assert torch.allclose(connector(feats), connector(feats[:, perm]), atol=1e-5) == same, positions


def test_frame_stack_keeps_reading_order_one_embedding_per_stack(model_dirs):
    """llm.connector=frame_stack: ceil(T / stack) embeddings (the last stack zero-padded), each from its own frames
    only, so the prefix follows the line: changing frame t changes embedding t // stack and no other."""
    connector = make_assist(model_dirs / "tiny-llama", connector="frame_stack", frame_stack=3).connector.eval()
    feats = torch.randn(2, T, D)                                                      # T = 16 -> 6 embeddings
    with torch.no_grad():
        prefix = connector(feats)                                                     # (B, 6, H)
        changed = feats.clone()
        changed[:, 7] = torch.randn(2, D)                                                  # frame 7: embedding 2
        moved = (connector(changed) - prefix).abs().amax(dim=(0, 2))                  # (6,)
    assert prefix.shape == (2, 6, make_assist(model_dirs / "tiny-llama").lm.hidden_size)
    assert moved[2] > 1e-3 and torch.all(moved[[0, 1, 3, 4, 5]] == 0), moved


@pytest.mark.parametrize("extra, message", [({"connector": "linear"}, "llm.connector must be qformer or frame_stack"),
                                            ({"connector": "frame_stack", "frame_stack": 0},
                                             "llm.frame_stack must be a whole number of frames >= 1")])
def test_connector_settings_are_checked(model_dirs, extra, message):
    with pytest.raises(LLMLoadError, match=message):
        make_assist(model_dirs / "tiny-llama", **extra)


def test_prefix_norm_starts_on_the_lm_embedding_scale(model_dirs):
    feats = torch.randn(3, T, D) * 5
    assist = make_assist(model_dirs / "tiny-llama", prefix_norm=True)
    rms = assist.lm.embedding_rms()
    assert rms > 0 and assist.diagnostics(feats, TEXTS[:1] * 3)["prefix_rms"] == pytest.approx(1.0, rel=0.05)
    assert make_assist(model_dirs / "tiny-llama").connector.prefix_norm is None


def test_text_only_loss_scores_every_text_token(model_dirs):
    """The baseline L_LLM is compared with: [head] text EOS, every text token scored, the first one included."""
    assist = make_assist(model_dirs / "tiny-llama").eval()
    lm = assist.lm
    ids = lm.encode(TEXTS[:1])[0]
    seq = torch.tensor([[lm.bos_id, *ids, lm.eos_id]])                               # (1, L)
    logits = lm.model(input_ids=seq).logits[0, :-1]                                   # (L-1, V)
    expected = F.cross_entropy(logits, seq[0, 1:])
    got = assist.diagnostics(torch.randn(1, T, D), TEXTS[:1])["llm_text_only"]
    assert got == pytest.approx(expected.item(), rel=1e-5)


CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_template_puts_the_prefix_in_the_user_turn(model_dirs, tmp_path):
    """llm.chat_template: head = the template up to the user's message + the prompt, bridge = the rest up to the
    answer; auto follows the tokenizer; true without a template is one clear error."""
    from transformers import AutoTokenizer
    chat_dir = tmp_path / "chat-llama"
    import shutil
    shutil.copytree(model_dirs / "tiny-llama", chat_dir)
    tok = AutoTokenizer.from_pretrained(chat_dir)
    tok.chat_template = CHAT
    tok.save_pretrained(chat_dir)
    assist = make_assist(chat_dir, chat_template="auto", prompt="Read:")
    decode = assist.lm.tokenizer.decode
    assert assist.lm.chat
    assert decode(assist.lm.head_ids).replace(" ", "") == "<|user|>Read:"
    assert decode(assist.lm.bridge_ids).replace(" ", "") == "</s><|assistant|>"
    batch = assist.lm.batch(TEXTS, Q)
    assert batch.text_start == len(assist.lm.head_ids) + Q + len(assist.lm.bridge_ids)
    assert torch.isfinite(assist(torch.randn(2, T, D), TEXTS))
    assert not make_assist(model_dirs / "tiny-llama", chat_template="auto").lm.chat     # no template: raw
    with pytest.raises(LLMLoadError, match="has no chat template: set llm.chat_template=false"):
        make_assist(model_dirs / "tiny-llama", chat_template=True)
    with pytest.raises(LLMLoadError, match="llm.chat_template must be auto, true or false"):
        make_assist(model_dirs / "tiny-llama", chat_template="yes")


def test_connector_for_another_lm_width_is_one_clear_error(model_dirs):
    llama, gpt2 = make_assist(model_dirs / "tiny-llama"), make_assist(model_dirs / "tiny-gpt2")   # H = 64 vs 48
    with pytest.raises(ValueError, match="another LM or tap width: connector.proj.2.weight"):
        gpt2.load_trainable_state_dict(llama.trainable_state_dict())


def test_tap_gradients_split_ctc_from_llm_and_balance_them():
    """At the tap: the CTC part (every row) and the LLM part (the sampled rows) are told apart; with a ratio the
    LLM part reaching the recognizer is rescaled to ratio x the CTC part's norm, whatever its own scale."""
    from htr.llm_assist import TapGradients
    w_ctc, w_llm = torch.randn(4, 3, 5), torch.randn(2, 3, 5) * 1e4                   # L_LLM 4 orders larger
    idx = torch.tensor([1, 3])
    for ratio in (0.0, 0.3):
        x = torch.randn(4, 3, 5, requires_grad=True)
        tap = x * 1.0                                                                 # a non-leaf, as in the model
        grads = TapGradients(ratio)
        ((tap * w_ctc).sum() + (grads.attach(tap, idx) * w_llm).sum()).backward()
        g_llm = torch.zeros(4, 3, 5)
        g_llm[idx] = w_llm
        assert grads.stats["grad_ctc"] == pytest.approx(w_ctc.norm().item(), rel=1e-5)
        assert grads.stats["grad_llm"] == pytest.approx(g_llm.norm().item(), rel=1e-5)
        scale = ratio * w_ctc.norm() / g_llm.norm() if ratio else 1.0
        torch.testing.assert_close(x.grad, w_ctc + scale * g_llm)


def test_llama3b_shaped_config_has_3b_parameters():
    import torch
    from transformers import AutoModelForCausalLM
    from htr.llm_weights import llama3b_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama3b_config(1, 2), dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert 3.1e9 < n < 3.3e9 and model.config.hidden_size == 3072          # 6.4 GB in bf16
    assert next(model.parameters()).dtype == torch.bfloat16
