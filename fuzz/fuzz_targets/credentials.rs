#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| regmirror_cache::fuzzing::credentials(data));
