"""Publishing a merge: the model card and the push to the Hub."""
