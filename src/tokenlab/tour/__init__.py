"""Demo code in one place: the toy world, the tour and the worked examples.

* :mod:`tokenlab.tour.toy` — the toy world (stdlib corpus, BPE tokenizer, tiny trained Llamas);
* :mod:`tokenlab.tour.report` — ``python -m tokenlab.tour``: one report section per family, each in
  ``tokenlab.tour.<family>``;
* :mod:`tokenlab.tour.preference` and :mod:`tokenlab.tour.transplant` — the worked experiments the
  alignment and tokenization sections (and their benchmarks) run.

No family imports this package; it imports the families.
"""
