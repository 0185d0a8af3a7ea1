document.documentElement.classList.add("js");
document.addEventListener("click", function (e) {
  var b = e.target.closest && e.target.closest("button.copy");
  if (!b) return;
  var text = b.getAttribute("data-copy");
  var done = function () { b.textContent = "copied"; b.classList.add("copied"); };
  var select = function () {
    var area = document.createElement("textarea");
    area.value = text; area.setAttribute("readonly", ""); area.className = "offscreen";
    document.body.appendChild(area); area.select();
    if (document.execCommand("copy")) done();
    document.body.removeChild(area);
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, select);
  } else {
    select();
  }
});
