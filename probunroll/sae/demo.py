def demo(out_dir):
    raise NotImplementedError
