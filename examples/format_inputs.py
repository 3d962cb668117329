"""Show what a POLAR reward model reads, on a tokenizer built offline.

    python examples/format_inputs.py

With a real model, `trl-polar format --model internlm/POLAR-7B --prompt ... --reference ... --candidate ...`
prints the same for that model's tokenizer.
"""

import argparse

from trl_polar import PolarTemplate
from trl_polar.tiny import build_tiny_tokenizer

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
template = PolarTemplate(build_tiny_tokenizer(), max_length=64, max_response_length=16)
rows = [
    ("How many 'r's are in the word 'strawberry'?", "3.", "There are three 'r's in the word 'strawberry'."),
    ([{"role": "user", "content": "What is 2 + 2?"}], [{"role": "assistant", "content": "4"}], "5"),
    ("Summarise: " + "lorem ipsum " * 30, "A short summary.", "Lorem ipsum, repeated."),
]
for prompt, reference, candidate in rows:
    encoding = template.build(prompt, reference, candidate)
    print(template.format(prompt, reference, candidate))
    print(f"  -> {len(encoding.input_ids)} tokens, truncated: {encoding.truncation_report() or 'nothing'}\n")
