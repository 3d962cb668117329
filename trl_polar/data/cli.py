"""`trl-polar build-data` and `trl-polar convert-data`: thin wrappers over `synthesis` and `converters`.

Registered in the main app by ``trl_polar.cli``; also runnable alone as ``python -m trl_polar.data.cli``, which is
also how ``accelerate launch -m trl_polar.data.cli build-data ...`` runs one shard set per rank.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from .converters import FORMATS, PAIRS, TIES
from .synthesis import BACKENDS, INCOMPLETE_ENDINGS, OUTPUT_FORMATS


def build_data_command(
    policies: Annotated[
        list[str],
        typer.Option(
            "--policies",
            "--policy",
            help="A pool policy as [NAME=]PATH[:base|:chat]; repeat the option for each (at least two).",
        ),
    ],
    corpus: Annotated[
        list[Path], typer.Option(help="Text corpus files (.txt one document per line, .jsonl, .json, .parquet).")
    ],
    out: Annotated[Path, typer.Option(help="Output directory; an unfinished run there resumes.")],
    num_prompts: Annotated[int | None, typer.Option(help="Prompts to sample (default: one per document).")] = None,
    instructions: Annotated[
        list[Path] | None, typer.Option(help="Instruction-prompt files, answered only by chat policies.")
    ] = None,
    instruction_share: Annotated[float, typer.Option(help="Share of prompts drawn from --instructions.")] = 0.0,
    text_column: Annotated[str, typer.Option(help="Corpus column holding the documents.")] = "text",
    instruction_column: Annotated[str, typer.Option(help="Instruction column (text or messages).")] = "prompt",
    tokenizer: Annotated[
        str | None, typer.Option(help="Tokenizer measuring prefix lengths (default: the first policy's).")
    ] = None,
    max_prefix_tokens: Annotated[int, typer.Option(help="Longest prompt prefix in tokens (paper: 1024).")] = 1024,
    backend: Annotated[str, typer.Option(help=f"Generation backend: {' | '.join(BACKENDS)}.")] = "transformers",
    batch_size: Annotated[int, typer.Option(help="Prompts per generate call (transformers backend).")] = 16,
    shard_size: Annotated[int, typer.Option(help="Prompts per output shard (the unit of resumption).")] = 1000,
    output_format: Annotated[str, typer.Option(help=f"Shard format: {' | '.join(OUTPUT_FORMATS)}.")] = "parquet",
    seed: Annotated[int, typer.Option(help="Seed of prompts, A/B draws and sampling.")] = 0,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (paper: 1.0).")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Top-p (paper: 0.9).")] = 0.9,
    top_k: Annotated[int, typer.Option(help="Top-k (paper: 50).")] = 50,
    max_new_tokens: Annotated[int, typer.Option(help="Longest trajectory in tokens (paper: 4096).")] = 4096,
    incomplete_endings: Annotated[
        str, typer.Option(help=f"Trajectories that hit the cap: {' | '.join(INCOMPLETE_ENDINGS)}.")
    ] = "trim",
    no_loop_trimming: Annotated[bool, typer.Option(help="Keep repetition loops whole.")] = False,
    chat_on_prefixes: Annotated[bool, typer.Option(help="Let chat policies continue raw-text prefixes too.")] = False,
    dtype: Annotated[str, typer.Option(help="Model dtype: auto | bfloat16 | float16 | float32.")] = "auto",
    max_loaded_policies: Annotated[int, typer.Option(help="Policies held in memory at once.")] = 2,
    no_progress: Annotated[bool, typer.Option(help="Hide progress bars.")] = False,
) -> None:
    """Synthesise POLAR pre-training triples: prompts from a corpus, answered by a pool of policies (A, A, B)."""
    from transformers import AutoTokenizer

    from .prompts import PromptConfig, sample_prompts
    from .synthesis import Policy, SamplingConfig, SynthesisConfig, synthesize

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pool = [Policy.parse(spec) for spec in policies]
    prompt_config = PromptConfig(
        num_prompts=num_prompts,
        max_prefix_tokens=max_prefix_tokens,
        instruction_share=instruction_share,
        text_column=text_column,
        instruction_column=instruction_column,
        seed=seed,
    )
    sampling_tokenizer = AutoTokenizer.from_pretrained(tokenizer or pool[0].path)
    prompts = sample_prompts(
        [str(p) for p in corpus],
        sampling_tokenizer,
        prompt_config,
        instructions=[str(p) for p in instructions] if instructions else None,
    )
    config = SynthesisConfig(
        out_dir=str(out),
        policies=pool,
        seed=seed,
        shard_size=shard_size,
        output_format=output_format,
        backend=backend,
        batch_size=batch_size,
        dtype=dtype,
        chat_on_prefixes=chat_on_prefixes,
        max_loaded_policies=max_loaded_policies,
        progress=not no_progress,
        sampling=SamplingConfig(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_new_tokens=max_new_tokens,
            incomplete_endings=incomplete_endings,
            trim_loops=not no_loop_trimming,
        ),
    )
    result = synthesize(prompts, config)
    totals = dict(result.totals)
    totals.update({f"prompt_sampling_{k}": v for k, v in prompts.counts.items()})
    typer.echo(json.dumps({"out": str(result.out_dir), "complete": result.complete, "counts": totals}))


def convert_data_command(
    inputs: Annotated[list[Path], typer.Argument(help="Input files (.jsonl, .json, .parquet), read in order.")],
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
) -> None:
    """Convert a public preference format to POLAR rows (triples, listwise rows, RL prompts or best-of-N rows)."""
    from .converters import convert
    from .io import write_rows

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
    )
    write_rows(result.rows, out)
    if listwise_out is not None:
        write_rows(result.listwise, listwise_out)
    typer.echo(json.dumps({"out": str(out), "rows": len(result.rows), "counts": dict(result.counts)}))


app = typer.Typer(name="trl-polar-data", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.command("build-data")(build_data_command)
app.command("convert-data")(convert_data_command)


def main() -> None:
    try:
        app()
    except (ValueError, OSError) as e:
        typer.echo(f"Error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
