"""Stage 4's scoring of candidate sentences: the methods (`methods.METHODS`), their config and the validator
that combines them."""
