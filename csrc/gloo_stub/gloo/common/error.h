// Stand-in (see ../../README.md): gloo's exceptions reach tpp as std::exception.
#pragma once
