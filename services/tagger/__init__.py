"""The tagger service: tags a child's turn with one of Blip's emotions, or none.

`classifier` (model, features, JSONL tagging; no grpc), `words` (its TF-IDF word block),
`train` (`python -m tagger.train`), `servicer` and `server` (`python -m tagger.server`). Nothing is imported here, so that
`import tagger.classifier` stays free of grpc and scikit-learn.
"""
