"""The plumbing under the method files: what keeps runs safe, checked and fast, but is not the
method itself."""
