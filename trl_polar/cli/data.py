"""``trl-polar build-data`` and ``trl-polar convert-data``: thin wrappers over `trl_polar.data.synthesis` and
`trl_polar.data.converters`. ``accelerate launch -m trl_polar.cli build-data ...`` runs one shard set per rank."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from ..data.converters import FORMATS, PAIRS, TIES
from ..data.synthesis import BACKENDS, INCOMPLETE_ENDINGS, OUTPUT_FORMATS


def _option(kind: Any, help: str, *names: str) -> Any:
    return Annotated[kind, typer.Option(*names, help=help)]


# The options of build-data, one alias each, so that the command's signature reads as a list.
_Policies = _option(list[str], "A pool policy as [NAME=]PATH[:base|:chat]; repeat the option for each (at least "
                    "two).", "--policies", "--policy")  # fmt: skip
_Corpus = _option(list[Path], "Text corpus files (.txt one document per line, .jsonl, .json, .parquet).")
_Out = _option(Path, "Output directory; an unfinished run there resumes.")
_NumPrompts = _option(int | None, "Prompts to sample (default: one per document).")
_Instructions = _option(list[Path] | None, "Instruction-prompt files, answered only by chat policies.")
_InstructionShare = _option(float | None, "Share of prompts drawn from --instructions (default: the paper's mix, 0.01 "
                            "with --instructions and two chat policies in the pool, else 0).")  # fmt: skip
_TextColumn = _option(str, "Corpus column holding the documents.")
_InstructionColumn = _option(str, "Instruction column (text or messages).")
_Tokenizer = _option(str | None, "Tokenizer measuring prefix lengths and counting the manifest's tokens (default: "
                     "the first policy's).")  # fmt: skip
_MaxPrefixTokens = _option(int, "Longest prompt prefix in tokens (paper: 1024).")
_Backend = _option(str, f"Generation backend: {' | '.join(BACKENDS)}.")
_BatchSize = _option(int, "Prompts per generate call (transformers backend).")
_ShardSize = _option(int, "Prompts per output shard (the unit of resumption).")
_OutputFormat = _option(str, f"Shard format: {' | '.join(OUTPUT_FORMATS)}.")
_Seed = _option(int, "Seed of prompts, A/B draws and sampling.")
_Temperature = _option(float, "Sampling temperature (paper: 1.0).")
_TopP = _option(float, "Top-p (paper: 0.9).")
_TopK = _option(int, "Top-k (paper: 50).")
_MaxNewTokens = _option(int, "Longest trajectory in tokens (paper: 4096).")
_IncompleteEndings = _option(str, f"Trajectories that hit the cap: {' | '.join(INCOMPLETE_ENDINGS)}.")
_NoLoopTrimming = _option(bool, "Keep repetition loops whole.")
_ChatOnPrefixes = _option(bool, "Let chat policies continue raw-text prefixes too.")
_Dtype = _option(str, "Model dtype: auto | bfloat16 | float16 | float32.")
_MaxLoadedPolicies = _option(int, "Policies held in memory at once.")
_NoProgress = _option(bool, "Hide progress bars.")
_TrustRemoteCode = _option(bool, "Run the code a policy's (or the tokenizer's) repository ships, e.g. "
                           "InternLM2's. Off: such a policy stops the run with an error; nothing asks on the "
                           "terminal.")  # fmt: skip


def build_data_command(
    policies: _Policies,
    corpus: _Corpus,
    out: _Out,
    num_prompts: _NumPrompts = None,
    instructions: _Instructions = None,
    instruction_share: _InstructionShare = None,
    text_column: _TextColumn = "text",
    instruction_column: _InstructionColumn = "prompt",
    tokenizer: _Tokenizer = None,
    max_prefix_tokens: _MaxPrefixTokens = 1024,
    backend: _Backend = "transformers",
    batch_size: _BatchSize = 16,
    shard_size: _ShardSize = 1000,
    output_format: _OutputFormat = "parquet",
    seed: _Seed = 0,
    temperature: _Temperature = 1.0,
    top_p: _TopP = 0.9,
    top_k: _TopK = 50,
    max_new_tokens: _MaxNewTokens = 4096,
    incomplete_endings: _IncompleteEndings = "trim",
    no_loop_trimming: _NoLoopTrimming = False,
    chat_on_prefixes: _ChatOnPrefixes = False,
    dtype: _Dtype = "auto",
    max_loaded_policies: _MaxLoadedPolicies = 2,
    no_progress: _NoProgress = False,
    trust_remote_code: _TrustRemoteCode = False,
) -> None:
    """Synthesise POLAR pre-training triples: prompts from a corpus, answered by a pool of policies (A, A, B)."""
    from ..data.prompts import PromptConfig, default_instruction_share
    from ..data.synthesis import Policy, SamplingConfig, SynthesisConfig, synthesize
    from ..data.synthesis.store import read_manifest

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pool = [Policy.parse(spec, trust_remote_code) for spec in policies]
    if instruction_share is None:
        chat = sum(p.kind == "chat" for p in pool)
        instruction_share = default_instruction_share(bool(instructions), chat)
        if instructions and not instruction_share:
            logging.getLogger(__name__).warning(
                "--instructions are not used: the pool has %d chat policies and instruction prompts need two; add "
                "chat policies or pass --instruction-share.", chat
            )  # fmt: skip
    prompt_config = PromptConfig(num_prompts=num_prompts, max_prefix_tokens=max_prefix_tokens,
                                 instruction_share=instruction_share, text_column=text_column,
                                 instruction_column=instruction_column, seed=seed)  # fmt: skip
    prompts = _sample(corpus, instructions, tokenizer or pool[0].path, prompt_config, trust_remote_code)
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                              incomplete_endings=incomplete_endings, trim_loops=not no_loop_trimming)  # fmt: skip
    config = SynthesisConfig(out_dir=str(out), policies=pool, seed=seed, shard_size=shard_size,
                             output_format=output_format, backend=backend, batch_size=batch_size, dtype=dtype,
                             chat_on_prefixes=chat_on_prefixes, max_loaded_policies=max_loaded_policies,
                             progress=not no_progress, sampling=sampling, token_tokenizer=tokenizer,
                             trust_remote_code=trust_remote_code)  # fmt: skip
    result = synthesize(prompts, config)
    totals = dict(result.totals)
    totals.update({f"prompt_sampling_{k}": v for k, v in prompts.counts.items()})
    tokens = read_manifest(result.out_dir).get("tokens")
    typer.echo(json.dumps({"out": str(result.out_dir), "complete": result.complete, "tokens": tokens,
                           "counts": totals}))  # fmt: skip


def _sample(corpus: list[Path], instructions: list[Path] | None, tokenizer: str, config: Any, trust: bool) -> Any:
    from transformers import AutoTokenizer

    from ..data.prompts import sample_prompts

    files = [str(p) for p in instructions] if instructions else None
    # trust_remote_code is always explicit: with None, transformers asks on the terminal (and hangs on 8 ranks).
    measure = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust)
    return sample_prompts([str(p) for p in corpus], measure, config, files)


def convert_data_command(
    inputs: Annotated[
        list[Path], typer.Argument(help="Input files (.jsonl, .json, .parquet) or directories (read recursively).")
    ],
    input_format: Annotated[str, typer.Option("--format", help=f"Input format: {' | '.join(FORMATS)}.")],
    out: Annotated[Path, typer.Option(help="Output rows (.jsonl or .parquet).")],
    listwise_out: Annotated[
        Path | None, typer.Option(help="Also write listwise rows (ranked and ultrafeedback formats).")
    ] = None,
    skip_invalid: Annotated[bool, typer.Option(help="Skip and count malformed records instead of stopping.")] = False,
    ties: Annotated[str, typer.Option(help=f"Equal ranks: {' | '.join(TIES)}.")] = "error",
    pairs: Annotated[str, typer.Option(help=f"Pairs below the reference: {' | '.join(PAIRS)}.")] = "all",
    score_key: Annotated[str, typer.Option(help="UltraFeedback score field.")] = "fine-grained_score",
    reference_column: Annotated[str, typer.Option(help="TRL format: the reference column.")] = "reference",
    id_field: Annotated[str | None, typer.Option(help="Record id field checked for duplicates.")] = None,
    references: Annotated[
        str | None, typer.Option(help="Benchmark formats: a file of prompt/reference rows, one per prompt.")
    ] = None,
) -> None:
    """Convert a public preference format to POLAR rows (triples, listwise rows, RL prompts or best-of-N rows)."""
    from ..data.converters import convert
    from ..data.io import write_rows

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if listwise_out is not None and input_format not in ("ranked", "ultrafeedback"):
        raise ValueError(f"--listwise-out applies to the ranked and ultrafeedback formats, not {input_format!r}.")
    result = convert(
        input_format,
        [str(p) for p in inputs],
        skip_invalid=skip_invalid,
        ties=ties,
        pairs=pairs,
        score_key=score_key,
        reference_column=reference_column,
        id_field=id_field,
        references=references,
    )
    write_rows(result.rows, out)
    if listwise_out is not None:
        write_rows(result.listwise, listwise_out)
    typer.echo(json.dumps({"out": str(out), "rows": len(result.rows), "counts": dict(result.counts)}))
