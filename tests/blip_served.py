"""What the tests rely on the Blip profile serving on SmolLM2."""

# Generate steers a concept alone, so in the Blip profile the concept needs a child-safe alpha at
# which its effect passes the gate. empathy has one (8.2) in the committed record and kept it under
# every guard measured so far; happy's steering-alone ceiling moves with the guard (the guard that
# read in context, c1b53aa, left it none), and Chat serves it with its register instruction anyway.
# test_validation's redecide test fails if the record stops serving empathy so.
STEERED = "empathy"
