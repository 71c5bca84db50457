"""Model commands: `twinlm info`, `twinlm convert`, `twinlm export` and `twinlm reseal`.

Handlers import torch and the model modules when they run, so that `twinlm --help` stays fast. User errors
(an unknown preset, a bad setting, a folder that cannot be loaded or written) raise TwinlmError subclasses,
which `twinlm.cli.main` prints as one line with exit status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

from twinlm.config import ModelConfig
from twinlm.errors import ConfigError
from twinlm.hub import resolve_model

LICENSE_HELP = "the model card's license: a hub license id (mit, apache-2.0, cc-by-4.0, …) or other"


def register(commands) -> None:
    p = commands.add_parser("info", help="parameter counts and training FLOPs/token of a preset or model folder",
                            description="Print a model's shape, parameter counts (total, non-embedding) and training "
                                        "FLOPs per token (forward + backward, sliding windows counted).")
    p.add_argument("model", metavar="PRESET_OR_DIR",
                   help="a preset name (ettin-17m … ettin-1b, cpu-small, cpu-tiny) or a model folder")
    p.add_argument("--decoder", action="store_true", help="for a preset: the decoder (causal) variant")
    p.add_argument("--seq-len", type=int, default=1024, help="document length for FLOPs/token (default 1024)")
    p.add_argument("--predicted-fraction", type=float, default=None,
                   help="fraction of tokens the head runs on (default: 0.3 encoder MLM, 1.0 decoder)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _memory_arguments(p)
    p.set_defaults(handler=_info)

    c = commands.add_parser("convert", help="cross-objective weight conversion (encoder <-> decoder)",
                            description="Convert an encoder folder into a decoder folder or the reverse (HF format; "
                                        "loads in twinlm and transformers). Tokenizer files are copied along.")
    c.add_argument("src", metavar="SRC", help="HF ModernBERT / ModernBERT-decoder folder or twinlm checkpoint")
    c.add_argument("--to", required=True, choices=["encoder", "decoder"])
    c.add_argument("--out", required=True, metavar="DIR")
    c.add_argument("--global-rope-theta", type=float, default=None, help="set global RoPE θ in the result")
    c.add_argument("--local-rope-theta", type=float, default=None, help="set local RoPE θ in the result")
    c.add_argument("--overwrite", action="store_true", help="write into DIR when it is an earlier model folder")
    c.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="tokenizer folder to write beside the weights (default: the source's, or its run's)")
    c.add_argument("--license", default=None, help=LICENSE_HELP)
    c.set_defaults(handler=_convert)

    e = commands.add_parser("export", help="write any checkpoint (intermediate ones too) as a Hugging Face folder",
                            description="Write a model as a Hugging Face folder of its own kind (encoder: "
                                        "ModernBertForMaskedLM, decoder: ModernBertDecoderForCausalLM) with the run's "
                                        "tokenizer, a model card and a checksum manifest. CHECKPOINT is a training "
                                        "checkpoint (RUN/checkpoints/step-N) or any model folder twinlm.load reads.")
    e.add_argument("src", metavar="CHECKPOINT", help="RUN/checkpoints/step-N, RUN/final, or an HF model folder")
    e.add_argument("--out", required=True, metavar="DIR")
    e.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="tokenizer folder (default: the folder's own, else the run's recipe tokenizer or RUN/final)")
    e.add_argument("--no-tokenizer", action="store_true", help="write the weights without a tokenizer")
    e.add_argument("--license", default=None, help=LICENSE_HELP)
    e.add_argument("--overwrite", action="store_true",
                   help="replace DIR whole when it is an earlier model folder (config.json or MANIFEST.sha256)")
    e.set_defaults(handler=_export)

    r = commands.add_parser("reseal", help="accept your own edits to a model folder: rewrite its MANIFEST.sha256",
                            description="List the files of DIR that changed, were added or removed since its "
                                        "MANIFEST.sha256 was written (e.g. by tokenizer.save_pretrained(DIR) or "
                                        "AutoConfig.save_pretrained(DIR)), check that the folder still loads (the "
                                        "weights in twinlm, config.json in transformers, the tokenizer if there is "
                                        "one), then rewrite the manifest so that twinlm.load accepts the folder. "
                                        "Changed weights are refused unless --accept-weights.")
    r.add_argument("folder", metavar="DIR", help="a model folder with MANIFEST.sha256 (RUN/final, an export)")
    r.add_argument("--accept-weights", action="store_true",
                   help="accept changed weight files (you replaced them yourself; they must still load)")
    r.add_argument("--dry-run", action="store_true", help="list the changes and run the checks; write nothing")
    r.set_defaults(handler=_reseal)


def _config_for(name: str, decoder: bool) -> ModelConfig:
    if Path(name).is_dir():
        from twinlm.loading import check_size, read_config

        cfg = read_config(name)
        check_size(Path(name), cfg)  # before info builds it on the meta device
        return cfg
    if name not in ModelConfig.preset_names():
        raise ConfigError(f"{name!r} is neither a preset ({', '.join(ModelConfig.preset_names())}) "
                          f"nor a model folder")
    return ModelConfig.preset(name, causal=decoder)


def info(cfg: ModelConfig, seq_len: int = 1024, predicted_fraction: float | None = None) -> dict:
    """Shape, parameter counts and training FLOPs/token of a model of config `cfg` (built on the meta device)."""
    import torch

    from twinlm.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    if predicted_fraction is None:
        predicted_fraction = 1.0 if cfg.causal else 0.3
    total = model.num_parameters()
    return {
        "kind": "decoder" if cfg.causal else "encoder",
        "layers": cfg.num_layers, "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
        "heads": cfg.num_heads, "vocab": cfg.vocab_size, "layer_types": cfg.layer_types,
        "parameters": total, "non_embedding_parameters": model.num_parameters(non_embedding=True),
        "seq_len": seq_len, "predicted_fraction": predicted_fraction,
        "flops_per_token": model.flops_per_token(seq_len, predicted_fraction),
        "flops_per_token_all_predicted": model.flops_per_token(seq_len, 1.0),
    }


def _info(args) -> int:
    if args.seq_len <= 0:
        raise ConfigError("--seq-len must be positive")
    if args.predicted_fraction is not None and not 0.0 <= args.predicted_fraction <= 1.0:
        raise ConfigError("--predicted-fraction must be within [0, 1]")
    cfg = _config_for(str(resolve_model(args.model)), args.decoder)  # a hub id org/name@rev -> its snapshot
    if args.memory:
        return _memory(cfg, args)
    d = info(cfg, args.seq_len, args.predicted_fraction)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    n_global = sum(t == "full_attention" for t in d["layer_types"])
    print(f"{args.model} ({d['kind']}): {d['layers']} layers ({n_global} global), hidden {d['hidden']}, "
          f"GLU {d['intermediate']}, {d['heads']} heads, vocab {d['vocab']}")
    print(f"parameters:               {d['parameters']:,} ({d['parameters'] / 1e6:.1f}M)")
    print(f"non-embedding parameters: {d['non_embedding_parameters']:,} ({d['non_embedding_parameters'] / 1e6:.1f}M)")
    print(f"training FLOPs/token at seq {d['seq_len']}: {d['flops_per_token']:.4g} "
          f"(head on {d['predicted_fraction']:.0%} of tokens); {d['flops_per_token_all_predicted']:.4g} with "
          f"every token predicted")
    return 0


def _memory_arguments(p) -> None:
    g = p.add_argument_group("memory plan (--memory)")
    g.add_argument("--memory", action="store_true",
                   help="estimate per-rank training memory (twinlm.memory) instead of the shape summary")
    g.add_argument("--card", default=None, help="a card to check the estimate against and plan for (H100, H200, "
                                                "A100-80GB, A100-40GB, L40S, A10G, RTX4090)")
    g.add_argument("--ranks", type=int, default=1, help="ranks training together (default 1)")
    g.add_argument("--micro-batch-tokens", type=int, default=65536,
                   help="tokens per forward pass and rank (default 65536, the Ettin recipes')")
    g.add_argument("--fsdp", action="store_true", help="parameters, gradients and optimizer state sharded (FSDP2)")
    g.add_argument("--checkpointing", action="store_true", help="activation checkpointing on")
    g.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])


def _memory(cfg: ModelConfig, args) -> int:
    from twinlm import memory

    kw = dict(ranks=args.ranks, sharded=args.fsdp, precision=args.precision,
              predicted_fraction=args.predicted_fraction)
    est = memory.estimate(cfg, micro_batch_tokens=args.micro_batch_tokens, checkpointing=args.checkpointing,
                          card=args.card, **kw)
    chosen = None
    if args.card is not None and not est.fits:
        chosen = memory.plan(cfg, card=args.card, micro_batch_tokens=args.micro_batch_tokens, ranks=args.ranks,
                             sharded=args.fsdp, precision=args.precision)
    if args.json:
        print(json.dumps({"estimate": est.to_dict(), "plan": chosen.to_dict() if chosen else None}, indent=2))
        return 0
    print(f"{args.model}: " + memory.describe(est))
    if chosen is not None:
        print(f"fits with micro_batch_tokens={chosen.micro_batch_tokens} and activation_checkpointing="
              f"{str(chosen.checkpointing).lower()} ({chosen.total / memory.GiB:.1f} GiB)")
    return 0


def _convert(args) -> int:
    from twinlm.convert import convert

    out = convert(resolve_model(args.src), args.to, args.out, global_rope_theta=args.global_rope_theta,
                  local_rope_theta=args.local_rope_theta, overwrite=args.overwrite, tokenizer=args.tokenizer,
                  license=args.license)
    print(f"wrote {args.to} to {out}")
    return 0


def _export(args) -> int:
    from twinlm.convert import export_model
    from twinlm.loading import read_config

    out = export_model(args.src, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite, license=args.license,
                       allow_no_tokenizer=args.no_tokenizer)
    kind = "decoder" if read_config(out).causal else "encoder"
    print(f"wrote {kind} {args.src} as a Hugging Face folder to {out}")
    return 0


def _reseal(args) -> int:
    from twinlm.reseal import reseal

    r = reseal(args.folder, accept_weights=args.accept_weights, dry_run=args.dry_run)
    if r.manifest != "whole":
        print(f"{r.folder}: MANIFEST.sha256 {r.manifest}: every file counts as added")
    for what, names in (("changed", r.changed), ("added", r.added), ("removed", r.removed)):
        if names:
            print(f"{what + ':':9s}{', '.join(names)}")
    for line in r.checked:
        print(f"checked: {line}")
    if not r.edited:
        print(f"{r.folder}: nothing changed since MANIFEST.sha256 was written; left as it is")
    elif r.written:
        print(f"resealed {r.folder}: twinlm.load accepts it as it is now")
    else:
        print(f"{r.folder}: would reseal (--dry-run: nothing written)")
    return 0
