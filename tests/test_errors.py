"""Errors name options the way each front end spells them."""

from __future__ import annotations

from compressor.errors import OptionError, flag_name, python_name


def test_an_option_error_words_options_for_each_front_end():
    error = OptionError("method fixed_loss needs {max_acc_loss} (received {value!r})", value=-1)
    assert str(error) == "method fixed_loss needs max_acc_loss= (received -1)"
    assert error.render(flag_name) == "method fixed_loss needs --max-acc-loss (received -1)"
    assert error.render(python_name) == str(error)


def test_any_library_error_can_name_options():
    from compressor.errors import DataError

    error = DataError.naming("data file not found: {spec} (given as {test_data})", spec="a.npz")
    assert isinstance(error, DataError) and str(error) == "data file not found: a.npz (given as test_data=)"
    assert error.render(flag_name) == "data file not found: a.npz (given as --test-data)"
    plain = DataError("no options named here {not a placeholder}")
    assert plain.render(flag_name) == str(plain)
