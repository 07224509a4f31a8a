"""Small training examples shared by the tests that compare two ways of taking a step."""

from biencoder.data.sts import ScoredPair

# Scores spread over the 0-5 range, so that every pair ranks differently for CoSENT.
SCORED = [
    ScoredPair("a man plays guitar", "a person plays an instrument", 4.2),
    ScoredPair("a cat sleeps", "a dog barks loudly at night", 0.8),
    ScoredPair("the sun is hot", "the sun is very hot", 4.9),
    ScoredPair("kids play football", "children are playing soccer outside", 4.0),
    ScoredPair("it rains", "stock markets fell", 0.0),
    ScoredPair("a woman cooks", "a woman is cooking dinner", 3.1),
]
