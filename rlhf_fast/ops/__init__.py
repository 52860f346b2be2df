"""The ops: for each, host launcher -> custom op with autograd -> public function."""
