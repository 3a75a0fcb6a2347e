// Copy buttons beside the keys shown once: the page works without this.
document.querySelectorAll("button[data-copy]").forEach(function (button) {
  button.hidden = false;
  button.addEventListener("click", function () {
    var field = document.getElementById(button.dataset.copy);
    field.select();
    navigator.clipboard.writeText(field.value).then(function () { button.textContent = "Copied"; },
                                                    function () { document.execCommand("copy"); button.textContent = "Copied"; });
  });
});
