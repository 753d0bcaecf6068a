pub fn placeholder_lib() {}
