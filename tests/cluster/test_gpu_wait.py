"""--device cuda asks for a GPU and waits for one (progress lines), then fails in one line when
none joins within --gpu-wait, instead of refusing at once."""
import pytest

from tests.pipelines.test_embed import gallery, tiny_model, write  # noqa: F401 (fixture)


@pytest.mark.slow
def test_cuda_waits_for_a_gpu_then_fails_in_one_line(tmp_path, tiny_model, ray_local):  # noqa: F811
    from pipelines.embed import main

    write(gallery(6), tmp_path / "s")
    with pytest.raises(RuntimeError, match=r"no GPU joined the Ray cluster within 2s") as e:
        main(["--model", tiny_model, "--shards", str(tmp_path / "s"), "--out", str(tmp_path / "o"),
              "--device", "cuda", "--gpu-wait", "2"])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()
