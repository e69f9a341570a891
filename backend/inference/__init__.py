"""Where the models answer: in this process (`local`) or on RQ workers through Redis (`queue`), behind one surface."""
