"""Makes the tiny model the llama.cpp server tests run: a one-layer llama-architecture GGUF
whose next token depends on the current one only, drawn from bigram statistics of replies
shaped like the ones backforth parses (instructions, `Score: N`, `[RES]` answers, JSON
judgements, verdicts; a fifth opened by `<think>` blocks), so a server sampling from it gives
a mix of parseable and unparseable replies. Deterministic: the same file from the same versions.

    python make_model.py OUT.gguf

The tokenizer is written beside it as `tokenizer.json`: the served model's own, for exact
prompt counts.

How it works: the embedding of token t is one-hot; attention and the
feed-forward block are zero, so the residual stream is that one-hot vector; after RMS norm it
is sqrt(n_embd) at t, and the output matrix holds log P(next | t) / sqrt(n_embd) in column
t (n_embd is the vocabulary rounded up to a multiple of 64, the rest zero).
"""

import json
import random
import sys
from pathlib import Path

import numpy as np
import gguf
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

VOCAB = 768
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TOPICS = [
    "rivers", "bridges", "orchards", "lanterns", "harbours", "markets", "gardens",
    "compasses", "stone walls", "winter roads", "copper wire", "meadows", "engines",
    "ledgers", "valleys", "canals", "furnaces", "timber frames", "the river", "a bridge",
]
VERBS = ["built", "kept", "repaired", "measured", "planned", "cleaned", "used", "chosen"]
REASONS = [
    "The answer addresses the instruction",
    "The answer is complete and on topic",
    "The response reads like a forum post",
    "The answer is helpful but misses a detail",
    "The response does not answer the question",
]


def replies(rng: random.Random) -> list[str]:
    """Replies of every shape the tests parse, and some that parse as nothing."""
    out = []
    for _ in range(4000):
        topic, verb = rng.choice(TOPICS), rng.choice(VERBS)
        kind = rng.randrange(9)
        # A reasoning model's thinking opens some replies, for the server to split off.
        thought = (
            f"<think>\nI weigh how {rng.choice(TOPICS)} are {rng.choice(VERBS)}.\n</think>\n\n"
            if rng.random() < 0.2
            else ""
        )
        score = rng.choice([1, 2, 3, 3, 4, 4, 4, 5, 5])
        reason = rng.choice(REASONS)
        if kind == 0:
            out.append(f"Can you explain how {topic} are {verb}?")
        elif kind == 1:
            out.append(f"How are {topic} {verb} and kept in good order?")
        elif kind == 2:
            out.append(f"Write a short guide on how {topic} are {verb}.")
        elif kind == 3:
            out.append(f"{reason}.\nScore: {score}")
        elif kind == 4:
            out.append(f"Score: {score}")
        elif kind == 5:
            out.append(f'{{"reason": "{reason}.", "score": {score}}}')
        elif kind == 6:
            out.append(
                f"[RES]\nHere is how {topic} are {verb}: they are {verb} with care, "
                f"and {rng.choice(TOPICS)} are {rng.choice(VERBS)} the same way.\n[/RES]"
            )
        elif kind == 7:
            verdict = rng.choice(["good", "good", "bad"])
            out.append(f"The instruction is clear and can be answered.\nVerdict: {verdict}")
        else:
            out.append(f"{rng.choice(['4', '5', '3'])}")
        out[-1] = thought + out[-1]
    return out


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def main(path: str) -> None:
    rng = random.Random(7)
    texts = replies(rng)
    tok = train_tokenizer(texts)
    tok.save(str(Path(path).with_name("tokenizer.json")))
    vocab = tok.get_vocab()
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for piece, i in vocab.items():
        tokens[i] = piece
    start, end = vocab["<|im_start|>"], vocab["<|im_end|>"]
    prefix = tok.encode("assistant\n").ids

    counts = np.full((n, n), 0.02, dtype=np.float64)  # [current, next], smoothed
    for text in texts:
        ids = [start] + prefix + tok.encode(text).ids + [end]
        for a, b in zip(ids, ids[1:]):
            counts[a, b] += 1.0
    # Control tokens other than the end are never produced.
    for special in ("<|endoftext|>", "<|im_start|>"):
        counts[:, vocab[special]] = 1e-9
    logp = np.log(counts / counts.sum(axis=1, keepdims=True))

    # Heads need n_embd to divide evenly; the dimensions past the vocabulary stay zero.
    n_ff, n_head = 32, 4
    n_embd = -(-n // 64) * 64
    scale = np.sqrt(n_embd)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("backforth-bigram")
    w.add_context_length(8192)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_vocab_size(n)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIAL else gguf.TokenType.NORMAL for t in tokens]
    )
    model = json.loads(tok.to_str())["model"]
    w.add_token_merges(
        [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    )
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_eos_token_id(end)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    f16 = np.float16
    w.add_tensor("token_embd.weight", np.eye(n, n_embd, dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    # [n_vocab, n_embd]: row j (the next token), column t (the current one).
    output = np.zeros((n, n_embd), dtype=np.float32)
    output[:, :n] = logp.T / scale
    w.add_tensor("output.weight", output)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{name}.weight", np.zeros((n_embd, n_embd), dtype=f16))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("blk.0.ffn_gate.weight", np.zeros((n_ff, n_embd), dtype=f16))
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((n_ff, n_embd), dtype=f16))
    w.add_tensor("blk.0.ffn_down.weight", np.zeros((n_embd, n_ff), dtype=f16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(sys.argv[1])
